"""Inversion jobs on disk: inputs, manifest, atomic per-image results, resume, rank sharding, metrics merge.

A job directory::

    manifest.json        what the job is: the items (id, source, index), the generator and every setting
    records/<id>.json    one per finished image, written last (the commit marker): its metrics line
    recon/<id>.png       reconstruction
    latents/<id>.pt      {'latents': [n_latent, D], 'noises': [[1, r, r], ...]} (or .safetensors)
    edits/<id>_*.png     edited renderings (with --direction)
    metrics.jsonl        the records of every finished image in manifest order (rebuilt, never appended)
    grid.png             input | reconstruction | edits, one row per image (the first --grid-max images)

Every file is written to a temporary name in its folder, flushed to disk and renamed, so a killed job leaves
either a whole file or none; an image counts as done only when its record exists and names files that exist,
so a job killed at any instant and resumed loses nothing and repeats nothing. Ranks (torchrun) take disjoint
slices of the unfinished items and write only their own items' files; rank 0 alone writes the manifest,
metrics.jsonl and the grid.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
TENSOR_EXTS = {".pt", ".pth", ".npy"}
MANIFEST = "manifest.json"
FORMAT = "lsap-invert-job"


class JobError(ValueError):
    """A job cannot start or go on (bad input, mismatching resume, ...): the message says why and what to do."""


# ---- atomic files ----------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable, mode: str = "wb") -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(root: Path) -> int:
    """Delete the temporaries a killed run left (``.<name>.<random>.tmp``); only call while no rank writes."""
    n = 0
    for tmp in root.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


# ---- inputs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    id: str
    source: str
    index: int | None = None  # the entry of a tensor file; None for an image file

    @property
    def label(self) -> str:
        return self.source if self.index is None else f"{self.source}[{self.index}]"


def _safe(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60] or "x"


def load_tensor_file(path: Path) -> torch.Tensor:
    """Images from .pt / .pth / .npy: [N, 3, H, W] or [3, H, W] (NHWC / HWC also accepted), float in [-1, 1] or
    uint8 in 0..255; returns float32 [N, 3, H, W] in [-1, 1]."""
    try:
        if path.suffix.lower() == ".npy":
            obj = torch.from_numpy(np.array(np.load(path, allow_pickle=False)))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise JobError(f"cannot read tensor input {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if isinstance(obj, dict):
        obj = obj.get("images", obj.get("x"))
    if not isinstance(obj, torch.Tensor):
        raise JobError(f"tensor input {path} must hold a tensor of images (or a dict with 'images'), "
                       f"got {type(obj).__name__}")
    t = obj
    if t.dim() == 3:
        t = t[None]
    if t.dim() == 4 and t.shape[1] != 3 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.dim() != 4 or t.shape[1] != 3 or t.shape[0] == 0:
        raise JobError(f"tensor input {path} has shape {tuple(obj.shape)}; expected images [N, 3, H, W] or "
                       "[3, H, W] (or channels-last) with 3 colour channels")
    if t.dtype == torch.uint8:
        return t.float() / 127.5 - 1
    if not t.is_floating_point():
        raise JobError(f"tensor input {path} has dtype {t.dtype}; expected float in [-1, 1] or uint8")
    t = t.float()
    if not torch.isfinite(t).all() or t.min() < -1.01 or t.max() > 1.01:
        raise JobError(f"tensor input {path} has values outside [-1, 1] (min {t.min().item():.3g}, max "
                       f"{t.max().item():.3g}); float images must be in [-1, 1] (uint8 in 0..255)")
    return t.clamp(-1, 1)


def expand_inputs(inputs: Iterable[str]) -> list[Item]:
    """Image files, folders of images (not recursive), globs, and .pt/.npy image tensors -> items, in order."""
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise JobError(f"input pattern {spec!r} matches no file")
            paths = [Path(m) for m in matches]
        elif p.is_dir() or p.is_file():
            paths = [p]
        else:
            raise JobError(f"input not found: {spec}")
        for q in paths:
            if q.is_dir():
                found = sorted(f for f in q.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
                if not found and not glob.has_magic(spec):
                    raise JobError(f"input folder {q} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
                files += found
            else:
                files.append(q)
    items, seen = [], set()
    for f in files:
        src = str(f.resolve())
        if f.suffix.lower() in TENSOR_EXTS:
            n = load_tensor_file(f).shape[0]
            for j in range(n):
                if (src, j) not in seen:
                    seen.add((src, j))
                    items.append(Item(f"{len(items):06d}_{_safe(f.stem)}_{j}", src, j))
        elif (src, None) not in seen:
            seen.add((src, None))
            items.append(Item(f"{len(items):06d}_{_safe(f.stem)}", src, None))
    if not items:
        raise JobError("no input images")
    return items


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop [N, 3, H, W] to a square and resize it to size × size (antialiased bicubic)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    return x


def load_image_file(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file as [3, size, size] in [-1, 1]: RGB, centre-cropped to a square, resized (Lanczos)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as exc:
        raise JobError(f"cannot read image {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        im = im.resize((size, size), Image.LANCZOS)
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1


def load_items(items: list[Item], size: int) -> torch.Tensor:
    """The preprocessed images of ``items`` as [N, 3, size, size] in [-1, 1]."""
    out, tensors = [], {}
    for it in items:
        if it.index is None:
            out.append(load_image_file(it.source, size))
        else:
            if it.source not in tensors:
                tensors[it.source] = load_tensor_file(Path(it.source))
            t = tensors[it.source]
            if it.index >= t.shape[0]:
                raise JobError(f"tensor input {it.source} has {t.shape[0]} images, the job expects entry {it.index}")
            out.append(resize_square(t[it.index:it.index + 1], size)[0])
    return torch.stack(out)


def validate_items(items: list[Item], size: int) -> None:
    """Decode every input once: every unreadable one is named in one ``JobError`` before any work starts."""
    bad = []
    for it in items:
        try:
            load_items([it], size)
        except JobError as exc:
            bad.append(str(exc))
    if bad:
        raise JobError(f"{len(bad)} of {len(items)} inputs cannot be used; nothing was inverted:\n  " + "\n  ".join(bad[:20])
                       + (f"\n  (+{len(bad) - 20} more)" if len(bad) > 20 else ""))


# ---- per-image results -----------------------------------------------------------------------------------
def save_latents(path: Path, latents: torch.Tensor, noises: list[torch.Tensor]) -> None:
    """One image's W+ [n_latent, D] and noise maps [1, r, r] as .pt (torch.load(weights_only=True)) or
    .safetensors (keys latents, noise_00, noise_01, ...)."""
    latents = latents.detach().float().cpu().contiguous()
    noises = [n.detach().float().cpu().contiguous() for n in noises]
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = {"latents": latents, **{f"noise_{i:02d}": n for i, n in enumerate(noises)}}
        atomic_write(path, lambda f: f.write(save(tensors)))
    else:
        atomic_write(path, lambda f: torch.save({"latents": latents, "noises": noises}, f))


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(W+ [n_latent, D], noise maps [[1, r, r], ...]) from a file ``save_latents`` wrote."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        d = load_file(str(path))
        return d["latents"], [d[k] for k in sorted(k for k in d if k.startswith("noise_"))]
    d = torch.load(path, map_location="cpu", weights_only=True)
    return d["latents"], list(d["noises"])


# ---- the job ---------------------------------------------------------------------------------------------
class Job:
    """A job directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest: dict | None = None

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def load(self) -> dict:
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise JobError(f"cannot read job manifest {self.manifest_path} ({exc})") from exc
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise JobError(f"{self.manifest_path} is not an lsap-invert job manifest")
        self.manifest = m
        return m

    def create(self, items: list[Item], generator: dict, config: dict) -> dict:
        m = {"format": FORMAT, "version": 1, "created": datetime.datetime.now().isoformat(timespec="seconds"),
             "generator": generator, "config": config, "items": [asdict(it) for it in items]}
        atomic_write_text(self.manifest_path, json.dumps(m, indent=1) + "\n")
        self.manifest = m
        return m

    def check_matches(self, items: list[Item] | None, generator: dict, config: dict) -> None:
        """Resume only the same job: same inputs (when given), same generator weights, same settings."""
        m = self.manifest
        diffs = [f"{k}: job has {m['config'].get(k)!r}, now {v!r}" for k, v in config.items() if m["config"].get(k) != v]
        diffs += [f"{k}: job has {m['config'][k]!r}, now not set" for k in m["config"] if k not in config]
        if m["generator"].get("sha256") != generator.get("sha256"):
            diffs.insert(0, f"generator: job has {m['generator'].get('source')} (weights {m['generator'].get('sha256')}), "
                            f"now {generator.get('source')} (weights {generator.get('sha256')})")
        if items is not None and [asdict(it) for it in items] != m["items"]:
            diffs.insert(0, f"inputs: job has {len(m['items'])} items, the given inputs make {len(items)} "
                            "(or the same number in another order); run --resume without inputs to use the job's")
        if diffs:
            raise JobError(f"--resume: {self.root} is a different job; nothing was changed. Differences:\n  "
                           + "\n  ".join(diffs))

    @property
    def items(self) -> list[Item]:
        return [Item(**d) for d in self.manifest["items"]]

    def record_path(self, item: Item) -> Path:
        return self.root / "records" / f"{item.id}.json"

    def read_record(self, item: Item) -> dict | None:
        """The item's record when the item is done (record readable and every file it names present)."""
        try:
            rec = json.loads(self.record_path(item).read_text())
        except (OSError, ValueError):
            return None
        files = [rec.get("reconstruction"), rec.get("latents"), *rec.get("edits", [])]
        if not all(f and (self.root / f).is_file() for f in files):
            return None
        return rec

    def pending(self) -> list[Item]:
        return [it for it in self.items if self.read_record(it) is None]

    def write_result(self, item: Item, record: dict, recon_png: Callable[[Path], None], latents, noises,
                     edits: dict[str, Callable[[Path], None]] | None = None, fmt: str = "pt") -> dict:
        """Write an image's files, then its record (the commit). ``recon_png(path)`` / ``edits[name](path)``
        write PNGs atomically (``images.save_png``)."""
        recon = Path("recon") / f"{item.id}.png"
        lat = Path("latents") / f"{item.id}.{fmt}"
        recon_png(self.root / recon)
        save_latents(self.root / lat, latents, noises)
        edit_files = []
        for name, write in (edits or {}).items():
            rel = Path("edits") / f"{item.id}_{name}.png"
            write(self.root / rel)
            edit_files.append(str(rel))
        rec = {"id": item.id, "input": item.source, **({"index": item.index} if item.index is not None else {}),
               **record, "reconstruction": str(recon), "latents": str(lat), "edits": edit_files}
        atomic_write_text(self.record_path(item), json.dumps(rec) + "\n")
        return rec

    def merge_metrics(self) -> list[dict]:
        """Rewrite metrics.jsonl (atomically) from the records of the finished items, in manifest order."""
        records = [r for r in (self.read_record(it) for it in self.items) if r is not None]
        atomic_write_text(self.root / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return records


# ---- ranks -----------------------------------------------------------------------------------------------
@dataclass
class Ranks:
    """This process's place under torchrun (RANK / WORLD_SIZE / LOCAL_RANK); a world of 1 without it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def init(self) -> None:
        """Join the process group: gloo, used only for barriers and small broadcasts (each rank computes alone)."""
        if self.distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=72))

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, items: list) -> list:
        return items[self.rank::self.world]

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
