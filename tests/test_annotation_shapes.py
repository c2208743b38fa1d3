"""Annotation lines in the shapes the datasets ship them: no entry dropped, renumbered or mislabelled silently.

Each test writes lines copied from the real files' shapes (CRLF endings, trailing spaces, HMDB51's
`#` names, apostrophes, parentheses, quoted commas) and checks what comes out, label by label.
The videos are empty files: find_videos only needs their names, and an extraction with limit=0 decodes none.
"""

from __future__ import annotations

import json
import re

import pytest

from mad.cache.store import Store
from mad.errors import MadError
from mad.extract.annotations import detect_format, read_annotations
from mad.extract.run import extract
from mad.extract.videos import find_videos
from tests.helpers import extract_config
from tests.test_annotations import _find, _touch


def test_hmdb51_clips_whose_names_start_with_a_hash_are_clips(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    # The official files: `name.avi N ` with a trailing space; these names are HMDB51's own.
    (splits / "clap_test_split1.txt").write_text("#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 1 \n"
                                                 "Kate's_(big)_applause_clap_u_cm_np1_fr_med_1.avi 1 \n"
                                                 "#20_Rhythm_clap_u_nm_np1_fr_goo_1.avi 2 \n")
    (splits / "pick_test_split1.txt").write_text(
        "#122_Cleaning_Up_The_Beach_In_Chiba__Japan_pick_f_nm_np1_le_bad_2.avi 1 \n"
        "#122_Cleaning_Up_The_Beach_In_Chiba__Japan_pick_f_nm_np1_le_bad_3.avi 0 \n")
    videos = _touch(tmp_path / "hmdb51_org", [
        "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi", "clap/Kate's_(big)_applause_clap_u_cm_np1_fr_med_1.avi",
        "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_1.avi",
        "pick/#122_Cleaning_Up_The_Beach_In_Chiba__Japan_pick_f_nm_np1_le_bad_2.avi"])
    found, said = _find(videos, splits, labels_split="train1")
    assert found.class_names == ["clap", "pick"]
    assert found.paths == ["clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi",
                           "clap/Kate's_(big)_applause_clap_u_cm_np1_fr_med_1.avi",
                           "pick/#122_Cleaning_Up_The_Beach_In_Chiba__Japan_pick_f_nm_np1_le_bad_2.avi"]
    assert found.labels == [0, 0, 1] and found.missing == []
    assert said == [f"{videos}: 1 videos are not listed in {splits}, left out"]  # the test clip
    found, _ = _find(videos, splits, labels_split="test1")
    assert (found.paths, found.labels) == (["clap/#20_Rhythm_clap_u_nm_np1_fr_goo_1.avi"], [0])


def test_lists_have_no_comments_a_hash_line_is_a_video(tmp_path):
    videos = _touch(tmp_path / "videos", ["#1 take.mp4", "b/2.mp4"])
    (tmp_path / "train.txt").write_text("#1 take.mp4 1\r\nb/2.mp4 0\r\n")
    found, said = _find(videos, tmp_path / "train.txt")
    assert (found.paths, found.labels, said) == (["#1 take.mp4", "b/2.mp4"], [1, 0], [])
    (tmp_path / "notes.txt").write_text("# my clips\nb/2.mp4 0\n")  # a comment is read as an entry, and refused
    with pytest.raises(MadError, match=r"notes.txt:1: expected 'path label' with an integer label"):
        find_videos(videos, tmp_path / "notes.txt")


UCF_CLASSES = "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n3 HandstandPushups\r\n"
UCF_TRAIN = ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nApplyLipstick/v_ApplyLipstick_g08_c01.avi 2\r\n"
             "HandstandPushups/v_HandStandPushups_g08_c01.avi 3\r\n")
UCF_TEST = ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nApplyLipstick/v_ApplyLipstick_g01_c01.avi\r\n"
            "HandstandPushups/v_HandStandPushups_g01_c01.avi\r\n")


@pytest.mark.parametrize("name, lines, shape", [("trainlist01.txt", UCF_TRAIN, r"Class/v_Class_gNN_cNN.avi N\)"),
                                                ("testlist01.txt", UCF_TEST, r"Class/v_Class_gNN_cNN.avi\)")])
def test_a_ucf101_list_without_class_ind_is_an_error_that_says_what_to_put_beside_it(tmp_path, name, lines, shape):
    (tmp_path / name).write_text(lines)
    with pytest.raises(MadError, match=re.escape(f"{tmp_path / name}: a UCF101 split list (") + shape +
                       re.escape(f" with no classInd.txt beside it; put UCF101's classInd.txt (ucfTrainTestlist/) "
                                 f"in {tmp_path}")):
        read_annotations(tmp_path / name)
    # With it beside the list, under any name, the list is UCF101's: 1-based in the file, 0-based out.
    (tmp_path / "classInd.txt").write_text(UCF_CLASSES)
    (tmp_path / "my_split.txt").write_text(lines)
    annotations = read_annotations(tmp_path / "my_split.txt")
    assert annotations.format == "ucf101"
    assert annotations.class_names == ["ApplyEyeMakeup", "ApplyLipstick", "HandstandPushups"]
    assert list(annotations.videos.values()) == [0, 1, 2]


def test_mmaction2s_own_ucf101_lists_are_numbered_from_0_and_read_as_mmaction(tmp_path):
    (tmp_path / "ucf101_train_split_1_videos.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 0\nHandstandPushups/v_HandStandPushups_g08_c01.avi 2\n"
        "ApplyLipstick/v_ApplyLipstick_g08_c01.avi 1\n")
    annotations = read_annotations(tmp_path / "ucf101_train_split_1_videos.txt")
    assert annotations.format == "mmaction"
    assert list(annotations.videos.values()) == [0, 2, 1] and annotations.class_names == ["0", "1", "2"]


def test_an_mmaction_list_numbered_from_1_is_an_error(tmp_path):
    (tmp_path / "train.txt").write_text(UCF_TRAIN)  # the case that shifted every UCF101 class by one
    with pytest.raises(MadError, match=r"train.txt: labels run 1..3 with no 0, but classes are numbered from 0 "
                                       r"here .*; renumber them from 0, or put label_map.txt beside it"):
        read_annotations(tmp_path / "train.txt", "mmaction")
    (tmp_path / "label_map.txt").write_text("ApplyEyeMakeup\r\nApplyLipstick\r\nHandstandPushups\r\n")
    with pytest.raises(MadError, match=r"train.txt: labels run 1..3 for the 3 names of .*label_map.txt, but "
                                       "MMAction2 numbers classes from 0"):
        read_annotations(tmp_path / "train.txt", "mmaction")
    # A map with a class 0 that has no video here confirms the numbering.
    (tmp_path / "label_map.txt").write_text("Archery\nApplyEyeMakeup\nApplyLipstick\nHandstandPushups\n")
    annotations = read_annotations(tmp_path / "train.txt", "mmaction")
    assert list(annotations.videos.values()) == [1, 2, 3] and annotations.class_names[3] == "HandstandPushups"
    (tmp_path / "numbers.csv").write_text("path,label\r\na.mp4,1\r\nb.mp4,2\r\n")
    with pytest.raises(MadError, match=r"numbers.csv: labels run 1..2 with no 0.*or give class names"):
        read_annotations(tmp_path / "numbers.csv")


def test_a_blank_line_inside_a_label_map_is_an_error_not_a_shift(tmp_path):
    (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 2\n")
    (tmp_path / "label_map.txt").write_text("abseiling\n\nzumba\nyoga\n\n")
    with pytest.raises(MadError, match=r"label_map.txt:2: an empty class name"):
        read_annotations(tmp_path / "train.txt")
    (tmp_path / "label_map.txt").write_text("abseiling\r\nbaking\r\nzumba\r\n\r\n")  # trailing blank lines: fine
    assert read_annotations(tmp_path / "train.txt").class_names == ["abseiling", "baking", "zumba"]


def test_a_ucf101_label_that_disagrees_with_its_folder_is_an_error(tmp_path):
    (tmp_path / "classInd.txt").write_text(UCF_CLASSES)
    (tmp_path / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\r\n")
    with pytest.raises(MadError, match=r"trainlist01.txt:1: label 2 is ApplyLipstick in classInd.txt, but the "
                                       r"video is in ApplyEyeMakeup/"):
        read_annotations(tmp_path / "trainlist01.txt")


def test_a_byte_order_mark_does_not_hide_the_first_entry(tmp_path):
    videos = _touch(tmp_path / "videos", ["a/1.mp4", "b/2.mp4"])
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbfa/1.mp4 0\r\nb/2.mp4 1\r\n")
    found, said = _find(videos, tmp_path / "train.txt")
    assert (found.paths, found.labels, said) == (["a/1.mp4", "b/2.mp4"], [0, 1], [])


KINETICS_700 = ('\ufefflabel,youtube_id,time_start,time_end,split\r\n'
                '"massaging person\'s head",--07WQ2iBlw,1,11,train\r\n'
                '"petting animal (not cat)",-0bBI1RPk_A,0,10,train \r\n'
                '"making tea, slowly",0123abcDEF_,30,40,train\r\n'
                'abseiling,  a-b_c ,5.0,15,train\r\n')


def test_kinetics_csv_with_quotes_apostrophes_parentheses_commas_and_crlf(tmp_path):
    (tmp_path / "train.csv").write_text(KINETICS_700)
    videos = _touch(tmp_path / "videos", ["massaging person's head/--07WQ2iBlw_000001_000011.mp4",
                                          "-0bBI1RPk_A_000000_000010.mp4", "0123abcDEF__000030_000040.mkv",
                                          "abseiling/a-b_c_000005_000015.webm"])
    assert detect_format(tmp_path / "train.csv") == "kinetics"
    found, said = _find(videos, tmp_path / "train.csv")
    assert found.class_names == ["abseiling", "making tea, slowly", "massaging person's head",
                                 "petting animal (not cat)"]
    assert dict(zip(found.paths, found.labels)) == {
        "massaging person's head/--07WQ2iBlw_000001_000011.mp4": 2, "-0bBI1RPk_A_000000_000010.mp4": 3,
        "0123abcDEF__000030_000040.mkv": 1, "abseiling/a-b_c_000005_000015.webm": 0}
    assert said == []


def test_ssv2_templates_with_apostrophes_commas_and_nested_placeholders(tmp_path):
    labels = {"Putting something that can't roll onto a slanted surface, so it stays where it is": "0",
              "Tipping something with something in it over, so something in it falls out": "1",
              "Putting number of something onto something": "2"}
    (tmp_path / "labels.json").write_text(json.dumps(labels, indent=1).replace("\n", "\r\n"))
    (tmp_path / "validation.json").write_text(json.dumps([
        {"id": "1", "template": "Tipping [something] with [something in it] over, so [something in it] falls out",
         "placeholders": ["cup", "water", "water"]},
        {"id": "2", "template": "Putting [number of] [something] onto [something]", "placeholders": ["2", "a", "b"]},
        {"id": "3", "template": "Putting [something that can't roll] onto a slanted surface, so it stays where it is",
         "placeholders": ["a die"]}]))
    annotations = read_annotations(tmp_path / "validation.json")
    assert annotations.videos == {"1": 1, "2": 2, "3": 0}


def test_a_video_listed_twice_with_two_labels_is_left_out_and_said(tmp_path):
    videos = _touch(tmp_path / "videos", ["a.mp4", "b.mp4", "c.mp4"])
    (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 1\na.mp4 1\nc.mp4 1\nc.mp4 1\n")
    found, said = _find(videos, tmp_path / "train.txt")
    assert (found.paths, found.labels) == (["b.mp4", "c.mp4"], [1, 1])
    assert said[:2] == [f"{tmp_path / 'train.txt'}: 1 videos are listed twice with different labels, left out "
                        "(first: a.mp4, lines 1 and 3)",
                        f"{tmp_path / 'train.txt'}: 1 videos are listed more than once with the same label, kept "
                        "once (first: c.mp4)"]
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end\nyoga,x,1,11\nzumba,x,1,11\n")
    with pytest.warns(UserWarning, match=r"k.csv: 1 videos are listed twice .* \(first: x_000001_000011, lines 2 "
                                         r"and 3\)"):
        assert read_annotations(tmp_path / "k.csv").videos == {}


def test_a_csv_label_column_of_numbers_with_a_name_in_it_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("path,label\na.mp4,0\nb.mp4,1\nc.mp4,1O\n")  # a typo: sorted as names,
    with pytest.raises(MadError, match=r"train.csv:4: label '1O' is a name, but line 2 gives a number \(0\)"):
        read_annotations(tmp_path / "train.csv")                                # '1O' would renumber '1'


def test_some_entries_without_a_label_are_said(tmp_path):
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end\nyoga,x,1,11\n,y,2,12\n")
    with pytest.warns(UserWarning, match=r"k.csv: 1 of 2 videos have no label, kept as unlabelled \(-1\) "
                                         r"\(first: y_000002_000012, line 3\)"):
        assert read_annotations(tmp_path / "k.csv").videos == {"x_000001_000011": 0, "y_000002_000012": -1}


@pytest.mark.parametrize("on_disk", ["--6bJUbfpnQ.mp4", "--6bJUbfpnQ_17_27.mp4"])
def test_no_listed_clip_found_shows_an_expected_name_beside_names_that_are_there(tmp_path, on_disk):
    videos = _touch(tmp_path / "videos", [f"riding a bike/{on_disk}", "zumba/0BZeBUPWQzo.mp4"])
    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                        "riding a bike,--6bJUbfpnQ,17,27,train\nzumba,0BZeBUPWQzo,4,14,train\n")
    with pytest.raises(MadError, match=re.escape(
            f"train.csv: none of its 2 videos is under {videos}: expected e.g. a file named "
            "--6bJUbfpnQ_000017_000027.<ext> (any video extension, <youtube_id>_<time_start:06d>_<time_end:06d>), "
            f"in any folder; found e.g. riding a bike/{on_disk}, zumba/0BZeBUPWQzo.mp4")):
        find_videos(videos, tmp_path / "train.csv")


def test_files_left_out_by_extension_and_stray_clips_beside_class_folders_are_said(tmp_path):
    videos = _touch(tmp_path / "videos", ["run/1.mp4", "run/2.ogv", "walk/3.mp4", "walk/3.mp4.part", ".DS_Store"])
    found, said = _find(videos, None)
    assert (found.paths, found.labels) == (["run/1.mp4", "walk/3.mp4"], [0, 1])
    assert said == [f"{videos}: 2 files are not taken as videos by their extension (.ogv 1, .part 1; first: "
                    "run/2.ogv); videos are .3gp, .avi, .flv, .m4v, .mkv, .mov, .mp4, .mpeg, .mpg, .ts, .webm, .wmv"]
    _touch(videos, ["stray.mp4"])
    found, said = _find(videos, None)
    assert found.labelled_by == "none" and found.labels == [-1, -1, -1]
    assert said[1] == (f"{videos}: 2 of 3 videos are in class folders (<class>/<clip>), 1 are not (first: "
                       "stray.mp4), so every video is unlabelled; move those into class folders, or pass --labels")


def test_a_rerun_that_labels_stored_videos_differently_is_refused(tmp_path):
    videos = _touch(tmp_path / "videos", ["run/1.mp4", "walk/2.mp4"])  # limit=0: nothing is decoded
    cfg = extract_config(videos, tmp_path / "cache", limit=0)
    assert extract(cfg)["videos"] == 2  # labelled by class folders: run 0, walk 1
    (tmp_path / "same.csv").write_text("path,label\nrun/1.mp4,run\nwalk/2.mp4,walk\n")
    cfg.labels = str(tmp_path / "same.csv")
    assert extract(cfg)["videos"] == 2  # the same labels by name: resumes
    (tmp_path / "fixed.csv").write_text("path,label\nrun/1.mp4,walk\nwalk/2.mp4,run\n")
    cfg.labels = str(tmp_path / "fixed.csv")  # before, the store kept its labels and the run said nothing
    with pytest.raises(MadError, match=re.escape(f"{tmp_path / 'cache'}: 2 of the videos it holds are labelled "
                                                 "differently now (first: run/1.mp4, 'run' in the store, 'walk' now")):
        extract(cfg)
    cfg.overwrite = True
    extract(cfg)
    assert Store.open(tmp_path / "cache").labels().tolist() == [1, 0]


def test_a_list_whose_every_entry_is_left_out_is_a_one_line_error(tmp_path):
    videos = _touch(tmp_path / "videos", ["x_000001_000011.mp4"])
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end\nyoga,x,1,11\nzumba,x,1,11\n")
    with pytest.warns(UserWarning, match="listed twice"), \
            pytest.raises(MadError, match=r"k.csv: no video is left to look for \(see the warnings above\)"):
        find_videos(videos, tmp_path / "k.csv")
