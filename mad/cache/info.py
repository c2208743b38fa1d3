"""`mad info`: what a cache holds, and (with --verify) whether every chunk reads back intact."""

from __future__ import annotations

import json

import numpy as np
from rich.console import Console
from rich.table import Table

from mad.cache.store import DONE, Store
from mad.tables import print_table


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def show_info(location: str, verify: bool = False, console: Console | None = None) -> bool:
    """Print the manifest, counts, per-layer shape and bytes; return False if verification found damage."""
    console = console or Console()
    store = Store.open(location)
    m = store.manifest.to_dict()
    counts = store.counts()
    console.print(f"[bold]{location}[/bold]  mad cache format {m['format_version']}, created {m.get('created')}")
    table = Table(show_header=False, box=None)
    for key in ("model", "pretrained", "pretrained_sha256", "layers", "frames", "clips", "crops", "image_size",
                "grid", "grid_downsample", "tokens", "width", "precision", "sampling", "storage", "branches",
                "shard_size", "videos_root"):
        if m.get(key) is not None:
            table.add_row(key, json.dumps(m[key]) if isinstance(m[key], (list, dict)) else str(m[key]))
    if m.get("train_views"):
        table.add_row("train views", _views(m["train_views"], m["augment"]))
    names = m.get("class_names") or []
    table.add_row("classes", f"{len(names)}: " + ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
                  if names else f"unlabelled (labelled by: {m.get('labelled_by', 'none')})")
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()))
    print_table(table, console)
    console.print(f"videos {counts['videos']}: [green]{counts['done']} done[/green], "
                  f"[red]{counts['failed']} failed[/red], {counts['pending']} pending")
    if counts["failed"]:
        console.print(f"failure reasons: {store.errors_location}")
    arrays = Table("array", "shape [V, views, ...]", "dtype", "on disk", "per done video-view")
    on_disk = store.bytes_on_disk()
    views_done = counts["done"] * store.manifest.views
    for name, (shape, dtype) in store.data_arrays.items():
        per_view = on_disk[name] / views_done if views_done else 0
        arrays.add_row(name, str([store.num_videos, *shape]), dtype, _human(on_disk[name]), _human(per_view))
    print_table(arrays, console)
    total = sum(on_disk.values())
    console.print(f"storage [bold]{store.manifest.storage}[/bold]: "
                  + (f"{total / views_done / 1e6:.3f} MB per video-view on disk" if views_done else "nothing done yet")
                  + (f"; fixed for training: {_fixed(store.manifest.compact)}" if store.manifest.compact else ""))
    labels = store.labels()[store.status() == DONE]
    if labels.size and (labels >= 0).any():
        per_class = np.bincount(labels[labels >= 0], minlength=len(names))
        console.print("done per class: " + ", ".join(
            f"{names[i] if i < len(names) else i} {n}" for i, n in enumerate(per_class)))
    if not verify:
        return True
    problems = store.verify()
    if not problems:
        console.print("[green]verify: every chunk read back and matched its checksum[/green]")
        return True
    for p in problems:
        console.print(f"[red]damaged[/red] {location}/{p['array']} videos {p['videos'][0]}..{p['videos'][1] - 1}: "
                      f"{p['reason']}")
    return False


def _fixed(compact: dict) -> str:
    return (f"cells of {compact['cell_size']}x{compact['cell_size']} patches, correlation radius "
            f"{compact['correlation']} in {compact['correlation_groups']} groups, values {compact['values']}, "
            f"{compact['record_bytes']:,} bytes per record")



def _views(count: int, augment: dict) -> str:
    scale, ratio = augment["scale"], augment["ratio"]
    return (f"{count} per video, drawn one per epoch by `mad train` (seed {augment['seed']}): a random frame in "
            f"each segment, random resized crop of {scale[0]:g}-{scale[1]:g} of the frame (aspect {ratio[0]:.3g}-"
            f"{ratio[1]:.3g}) at short side {augment['short_side']}, flips {'on' if augment['flip'] else 'off'}; "
            "each view's frames and box in frame_index, view_box")
