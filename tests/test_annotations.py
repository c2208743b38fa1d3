"""Dataset annotation formats read by --labels: Kinetics CSV, SSv2 JSON, UCF101 and HMDB51 split files.

Each test writes a small annotation set in the dataset's own layout; find_videos only needs the
paths, so the videos are empty files, except in the end-to-end extraction at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mad.cache.store import DONE, Store
from mad.errors import MadError
from mad.extract.annotations import detect_format, read_annotations
from mad.extract.videos import find_videos
from tests.helpers import ROOT, TINY_MODEL


def _touch(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def _find(root, labels, **options):
    """find_videos, and the one-line warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_videos(root, labels, **options)
    return found, [str(w.message) for w in caught]


KINETICS = """label,youtube_id,time_start,time_end,split
riding a bike,--6bJUbfpnQ,17,27,train
abseiling,-3B32lodo2M,59,69,train
zumba,0BZeBUPWQzo,4,14,train
abseiling,0m5hQ7IWk_k,0,10,train
"passing American football (in game)",a1_b-c,120,130,train
"""


def test_kinetics_csv_matches_clips_by_name_in_class_folders_or_flat(tmp_path):
    videos = _touch(tmp_path / "k400" / "train", [
        "riding a bike/--6bJUbfpnQ_000017_000027.mp4",  # class folder, spaces and all
        "abseiling/-3B32lodo2M_000059_000069.mp4",
        "0BZeBUPWQzo_000004_000014.webm",               # flat, another container
        "passing_american_football_in_game/a1_b-c_000120_000130.mkv",  # folder spelt differently
        "abseiling/notlisted_000001_000011.mp4",        # on disk, not in the CSV
    ])
    (tmp_path / "train.csv").write_text(KINETICS)        # 0m5hQ7IWk_k was never downloaded
    assert detect_format(tmp_path / "train.csv") == "kinetics"
    found, said = _find(videos, tmp_path / "train.csv")
    # Class index = sorted class names, from the CSV: a class whose clips are all missing keeps its place.
    assert found.class_names == ["abseiling", "passing American football (in game)", "riding a bike", "zumba"]
    assert found.paths == ["0BZeBUPWQzo_000004_000014.webm", "abseiling/-3B32lodo2M_000059_000069.mp4",
                           "passing_american_football_in_game/a1_b-c_000120_000130.mkv",
                           "riding a bike/--6bJUbfpnQ_000017_000027.mp4"]
    assert found.labels == [3, 0, 1, 2]
    assert found.labelled_by == "kinetics"
    assert found.missing == ["0m5hQ7IWk_k_000000_000010"] and found.unlisted == 1
    assert said == [f"{tmp_path / 'train.csv'}: 1 of 5 listed videos are not under {videos}, skipped "
                    "(first: 0m5hQ7IWk_k_000000_000010)",
                    f"{videos}: 1 videos are not listed in {tmp_path / 'train.csv'}, left out"]


def test_kinetics_700_2020_columns_and_a_test_csv_without_labels(tmp_path):
    videos = _touch(tmp_path / "videos", ["a_000001_000011.mp4", "b_000002_000012.mp4"])
    (tmp_path / "k700.csv").write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                                       "yoga,a,1,11,train,0\nbaking cookies,b,2.0,12.0,train,1\n")
    found, said = _find(videos, tmp_path / "k700.csv")
    assert (found.paths, found.labels, found.class_names, said) == (
        ["a_000001_000011.mp4", "b_000002_000012.mp4"], [1, 0], ["baking cookies", "yoga"], [])
    (tmp_path / "nosplit.csv").write_text("label,youtube_id,time_start,time_end\nyoga,a,1,11\n")
    assert find_videos(videos, tmp_path / "nosplit.csv", labels_format="kinetics").labels == [0]
    (tmp_path / "test.csv").write_text("youtube_id,time_start,time_end,split\na,1,11,test\nb,2,12,test\n")
    found, _ = _find(videos, tmp_path / "test.csv")
    assert (found.labels, found.class_names) == ([-1, -1], [])


SSV2_LABELS = {"Approaching something with your camera": "0", "Holding something next to something": "1",
               "Putting something, something and something on the table": "2"}


@pytest.mark.parametrize("labels_name", ["something-something-v2-labels.json", "labels.json"])
def test_ssv2_json_resolves_bracketed_templates_to_the_labels_json_index(tmp_path, labels_name):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / labels_name).write_text(json.dumps(SSV2_LABELS))
    train = [
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks vaporub bottle"]},
        {"id": "42326", "label": "putting a, b and c on the table",
         "template": "Putting [something], [something] and [something] on the table",
         "placeholders": ["a", "b", "c"]},
        {"id": "100904", "label": "approaching a cup with your camera",
         "template": "Approaching [something] with your camera", "placeholders": ["a cup"]},
        {"id": "5", "label": "holding a next to b", "template": "Holding [something] next to [something]",
         "placeholders": ["a", "b"]},
    ]
    (annotations / "train.json").write_text(json.dumps(train))
    videos = _touch(tmp_path / "20bn-something-something-v2", ["78687.webm", "42326.webm", "100904.mp4", "7.webm"])
    assert detect_format(annotations / "train.json") == "ssv2"
    found, said = _find(videos, annotations / "train.json")
    assert found.class_names == list(SSV2_LABELS)  # ordered by the labels JSON's values
    assert (found.paths, found.labels) == (["100904.mp4", "42326.webm", "78687.webm"], [0, 2, 1])
    assert (found.missing, found.unlisted) == (["5"], 1)
    assert len(said) == 2

    (annotations / "test.json").write_text(json.dumps([{"id": "78687"}, {"id": "7"}]))  # the test split: ids only
    found, _ = _find(videos, annotations / "test.json")
    assert (found.paths, found.labels, found.class_names) == (["7.webm", "78687.webm"], [-1, -1], list(SSV2_LABELS))


def test_ssv2_errors_name_the_file(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(SSV2_LABELS))
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "1", "template": "Spinning [something]"}]))
    with pytest.raises(MadError, match=r"bad.json: entry 1 \(id 1\): template 'Spinning something' is not in"):
        read_annotations(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('[{"id": "1",\n "template": }]')
    with pytest.raises(MadError, match=r"broken.json:2: not valid JSON"):
        read_annotations(tmp_path / "broken.json")
    with pytest.raises(MadError, match="labels.json: a class list, not a video list"):
        read_annotations(tmp_path / "labels.json")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "train.json").write_text("[]")
    with pytest.raises(MadError, match="no labels JSON beside it"):
        read_annotations(tmp_path / "alone" / "train.json")


def _ucf101(tmp_path):
    """UCF101's layout: UCF-101/<Class>/v_<Class>_gGG_cCC.avi and ucfTrainTestlist/."""
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    # Not alphabetical on purpose: the index must come from classInd.txt, not from sorting.
    (lists / "classInd.txt").write_text("1 Archery\n2 ApplyEyeMakeup\n3 HandstandPushups\n")
    (lists / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\r\n"
                                           "Archery/v_Archery_g08_c02.avi 1\r\n"
                                           "HandstandPushups/v_HandStandPushups_g08_c01.avi 3\r\n")
    (lists / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\n"
                                          "HandstandPushups/v_HandStandPushups_g01_c01.avi\r\n"
                                          "Archery/v_Archery_g02_c01.avi\r\n")
    videos = _touch(tmp_path / "UCF-101", [
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "Archery/v_Archery_g08_c02.avi",
        "HandstandPushups/v_HandStandPushups_g08_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
        "HandstandPushups/v_HandStandPushups_g01_c01.avi"])  # v_Archery_g02_c01 is missing
    return lists, videos


def test_ucf101_train_and_test_lists_with_class_ind(tmp_path):
    lists, videos = _ucf101(tmp_path)
    assert detect_format(lists / "trainlist01.txt") == "ucf101"
    found, said = _find(videos, lists / "trainlist01.txt")
    assert found.class_names == ["Archery", "ApplyEyeMakeup", "HandstandPushups"]
    assert found.paths == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "Archery/v_Archery_g08_c02.avi",
                           "HandstandPushups/v_HandStandPushups_g08_c01.avi"]
    assert found.labels == [1, 0, 2]
    assert (found.missing, found.unlisted) == ([], 2) and said == [
        f"{videos}: 2 videos are not listed in {lists / 'trainlist01.txt'}, left out"]

    found, said = _find(videos, lists / "testlist01.txt")  # no label column: the class is the folder
    assert found.paths == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
                           "HandstandPushups/v_HandStandPushups_g01_c01.avi"]
    assert found.labels == [1, 2] and found.missing == ["v_Archery_g02_c01"]
    # The folder and a split name the same file.
    by_split, _ = _find(videos, lists, labels_split="test1")
    assert (by_split.paths, by_split.labels, by_split.labelled_by) == (found.paths, found.labels, "ucf101")


def test_ucf101_errors_name_the_file_and_line(tmp_path):
    lists, videos = _ucf101(tmp_path)
    (lists / "trainlist02.txt").write_text("Archery/v_Archery_g08_c02.avi 1\nArchery/v_Archery_g09_c02.avi 4\n")
    with pytest.raises(MadError, match=r"trainlist02.txt:2: expected 'Class/video.avi'"):
        find_videos(videos, lists / "trainlist02.txt")
    (lists / "testlist02.txt").write_text("Bowling/v_Bowling_g01_c01.avi\n")
    with pytest.raises(MadError, match=r"testlist02.txt:1: expected 'Class/video.avi' with a class of classInd"):
        find_videos(videos, lists / "testlist02.txt")
    (lists / "classInd.txt").write_text("1 Archery\nApplyEyeMakeup\n")
    with pytest.raises(MadError, match=r"classInd.txt:2: expected 'index ClassName'"):
        find_videos(videos, lists / "trainlist01.txt")
    with pytest.raises(MadError, match="classInd.txt: UCF101's class list; pass trainlist0N.txt"):
        find_videos(videos, lists / "classInd.txt")
    with pytest.raises(MadError, match=r"testlist03.txt: not found \(--labels-split test3\)"):
        find_videos(videos, lists, labels_split="test3")


def _hmdb51(tmp_path):
    """HMDB51's layout: hmdb51_org/<class>/<video>.avi and testTrainMulti_7030_splits/<class>_test_splitN.txt."""
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    marks = {  # video -> (split 1, split 2) marks: 1 train, 2 test, 0 unused
        "wave": {"Wave_hello_wave_u_cm_np1_fr_med_0": (1, 2), "Wave_bye_wave_f_nm_np1_le_bad_1": (2, 1),
                 "Wave_extra_wave_h_cm_np1_fr_goo_2": (0, 1)},
        "brush_hair": {"April_09_brush_hair_u_nm_np1_ba_goo_0": (1, 1), "Brushing_(!)_brush_hair_h_nm_np1_fr_med_1":
                       (2, 0)},
        "cartwheel": {"Cartwheel_in_the_park_cartwheel_f_cm_np1_le_med_0": (1, 2)},  # never downloaded
    }
    for name, videos in marks.items():
        for split in (1, 2):
            # The official files end each line with a space.
            (splits / f"{name}_test_split{split}.txt").write_text(
                "".join(f"{video}.avi {mark[split - 1]} \n" for video, mark in videos.items()))
    videos = _touch(tmp_path / "hmdb51_org", [f"{name}/{video}.avi" for name, clips in marks.items()
                                              for video in clips if name != "cartwheel"])
    return splits, videos


def test_hmdb51_split_folder_with_a_split_name(tmp_path):
    splits, videos = _hmdb51(tmp_path)
    assert detect_format(splits) == "hmdb51"
    found, said = _find(videos, splits, labels_split="train1")
    assert found.class_names == ["brush_hair", "cartwheel", "wave"]
    assert found.paths == ["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
                           "wave/Wave_hello_wave_u_cm_np1_fr_med_0.avi"]
    assert found.labels == [0, 2]
    assert (found.missing, found.unlisted) == (["Cartwheel_in_the_park_cartwheel_f_cm_np1_le_med_0"], 3)
    assert len(said) == 2

    found, _ = _find(videos, splits, labels_split="test1")
    assert (found.paths, found.labels) == (["brush_hair/Brushing_(!)_brush_hair_h_nm_np1_fr_med_1.avi",
                                            "wave/Wave_bye_wave_f_nm_np1_le_bad_1.avi"], [0, 2])
    found, _ = _find(videos, splits, labels_split="train2")  # another split, another partition
    assert (found.paths, found.labels) == (["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
                                            "wave/Wave_bye_wave_f_nm_np1_le_bad_1.avi",
                                            "wave/Wave_extra_wave_h_cm_np1_fr_goo_2.avi"], [0, 2, 2])


def test_hmdb51_errors(tmp_path):
    splits, videos = _hmdb51(tmp_path)
    with pytest.raises(MadError, match="needs --labels-split train1, train2, train3, test1, test2 or test3"):
        find_videos(videos, splits)
    with pytest.raises(MadError, match=r"\(got 'val1'\)"):
        find_videos(videos, splits, labels_split="val1")
    with pytest.raises(MadError, match="one class of HMDB51's split files; pass their folder"):
        find_videos(videos, splits / "wave_test_split1.txt")
    (splits / "wave_test_split1.txt").write_text("Wave_hello_wave_u_cm_np1_fr_med_0.avi 1\nWave_bye.avi train\n")
    with pytest.raises(MadError, match=r"wave_test_split1.txt:2: expected 'video.avi 0\|1\|2'"):
        find_videos(videos, splits, labels_split="train1")


def test_format_detection_and_explicit_formats(tmp_path):
    _touch(tmp_path, ["lists/train.txt", "lists/ucf/classInd.txt", "lists/ucf/trainlist01.txt", "a.json"])
    (tmp_path / "paths.csv").write_text("path,label\na.mp4,0\n")
    (tmp_path / "k.csv").write_text("label, youtube_id ,time_start,time_end\n")
    assert detect_format(tmp_path / "lists" / "train.txt") == "mmaction"
    assert detect_format(tmp_path / "lists" / "ucf" / "trainlist01.txt") == "ucf101"
    assert detect_format(tmp_path / "lists" / "ucf") == "ucf101"
    assert detect_format(tmp_path / "paths.csv") == "csv"
    assert detect_format(tmp_path / "k.csv") == "kinetics"  # spaces around header names as some copies have
    assert detect_format(tmp_path / "a.json") == "ssv2"

    # A Kinetics CSV under another name is read as one when told so, and not otherwise.
    videos = _touch(tmp_path / "videos", ["x_000001_000011.mp4"])
    (tmp_path / "kinetics.txt").write_text("label,youtube_id,time_start,time_end\nyoga,x,1,11\n")
    assert find_videos(videos, tmp_path / "kinetics.txt", labels_format="kinetics").labels == [0]
    with pytest.raises(MadError, match="kinetics.txt: none of its 2 videos is under"):  # read as a path list
        find_videos(videos, tmp_path / "kinetics.txt")
    with pytest.raises(MadError, match="--labels-format 'k400': use auto, mmaction, csv, kinetics"):
        find_videos(videos, tmp_path / "kinetics.txt", labels_format="k400")
    with pytest.raises(MadError, match="--labels-format and --labels-split need --labels"):
        find_videos(videos, labels_format="kinetics")
    with pytest.raises(MadError, match="--labels-split train1: only for a folder of split files"):
        find_videos(videos, tmp_path / "kinetics.txt", labels_split="train1")
    with pytest.raises(MadError, match="paths.csv: the header has no youtube_id, time_start, time_end column"):
        find_videos(videos, tmp_path / "paths.csv", labels_format="kinetics")


def test_malformed_kinetics_rows_name_the_line(tmp_path):
    videos = _touch(tmp_path / "videos", ["x_000001_000011.mp4"])
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\nyoga,x,1,11,train\nyoga,y,1.5,11,train\n")
    with pytest.raises(MadError, match=r"k.csv:3: time_start '1.5' and time_end '11' must be whole seconds"):
        find_videos(videos, tmp_path / "k.csv")
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\nyoga,x,1,11,train\nyoga,y\n")
    with pytest.raises(MadError, match=r"k.csv:3: fewer columns than the header's 5"):
        find_videos(videos, tmp_path / "k.csv")


def test_listed_but_missing_and_on_disk_but_unlisted_in_a_path_list(tmp_path):
    videos = _touch(tmp_path / "videos", ["a/1.mp4", "b/2.mp4", "extra/3.mp4", "extra/4.mp4"])
    (tmp_path / "train.txt").write_text("a/1.mp4 0\nb/2.mp4 1\ngone/5.mp4 1\ngone/6.mp4 0\ngone/7.mp4 0\n"
                                        "gone/8.mp4 0\n")
    found, said = _find(videos, tmp_path / "train.txt")
    assert (found.paths, found.labels, found.labelled_by) == (["a/1.mp4", "b/2.mp4"], [0, 1], "mmaction")
    assert (len(found.missing), found.unlisted) == (4, 2)
    assert said == [f"{tmp_path / 'train.txt'}: 4 of 6 listed videos are not under {videos}, skipped "
                    "(first: gone/5.mp4, gone/6.mp4, gone/7.mp4)",
                    f"{videos}: 2 videos are not listed in {tmp_path / 'train.txt'}, left out"]


def test_nothing_listed_on_disk_and_duplicate_names_are_one_line_errors(tmp_path):
    videos = _touch(tmp_path / "videos", ["other.mp4"])
    (tmp_path / "train.txt").write_text("a/1.mp4 0\nb/2.mp4 1\n")
    with pytest.raises(MadError, match=re.escape(f"{tmp_path / 'train.txt'}: none of its 2 videos is under {videos}: "
                                                 "expected e.g. a/1.mp4 (a path relative to it); found e.g. other.mp4")):
        find_videos(videos, tmp_path / "train.txt")
    (tmp_path / "k.csv").write_text(KINETICS)
    with pytest.raises(MadError, match=r"k.csv: none of its 5 videos is under"):
        find_videos(videos, tmp_path / "k.csv")
    _touch(videos, ["yoga/x_000001_000011.mp4", "x_000001_000011.webm"])
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end\nyoga,x,1,11\n")
    with pytest.raises(MadError, match=r"k.csv: x_000001_000011 is 2 files under .*; keep one"):
        find_videos(videos, tmp_path / "k.csv")
    with pytest.raises(MadError, match="nope.csv: label file not found"):
        find_videos(videos, tmp_path / "nope.csv")


@pytest.mark.slow
@pytest.mark.e2e
def test_extract_from_a_kinetics_csv_on_the_command_line(tmp_path):
    from mad.synthetic import write_video

    rng = np.random.default_rng(0)
    names = ["yoga/aaa_000001_000011.mp4", "yoga/bbb_000005_000015.mp4", "abseiling/ccc_000000_000010.mp4",
             "ddd_000003_000013.mp4"]  # flat, no class folder
    for name in names:
        (tmp_path / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(tmp_path / "videos" / name, rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                        "yoga,aaa,1,11,train\nabseiling,ccc,0,10,train\nzumba,ddd,3,13,train\n"
                                        "yoga,zzz,2,12,train\n")  # zzz is missing; bbb is not listed
    result = subprocess.run(
        [sys.executable, "-m", "mad", "extract", "--videos", str(tmp_path / "videos"), "--out",
         str(tmp_path / "cache"), "--labels", str(tmp_path / "train.csv"), "--model", TINY_MODEL,
         "--pretrained", "none", "--layers", "2,4", "--precision", "fp32", "--workers", "0", "--store", "full"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert f"warning: {tmp_path / 'train.csv'}: 1 of 4 listed videos are not under {tmp_path / 'videos'}, " \
           "skipped (first: zzz_000002_000012)" in result.stderr.splitlines()
    assert f"warning: {tmp_path / 'videos'}: 1 videos are not listed in {tmp_path / 'train.csv'}, left out" \
        in result.stderr.splitlines()
    store = Store.open(tmp_path / "cache")
    assert store.paths() == ["abseiling/ccc_000000_000010.mp4", "ddd_000003_000013.mp4",
                             "yoga/aaa_000001_000011.mp4"]
    assert store.class_names == ["abseiling", "yoga", "zumba"]
    assert store.labels().tolist() == [0, 2, 1]
    assert store.manifest.labelled_by == "kinetics"
    assert (store.status() == DONE).all()
