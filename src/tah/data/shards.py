"""The on-disk layout of a labelling run, where every write is atomic so a killed run can resume.

    OUT/manifest.json         the settings and data fingerprint the run was started with
    OUT/shards/shard-00000/   one `datasets` dataset per `shard_size` rows, plus its counts.json;
                              written to shards/.shard-00000.tmp, then renamed
    OUT/dataset/              all shards concatenated (written to OUT/.dataset.tmp, then renamed)
    OUT/stats.json            summary statistics (temp file + os.replace); its presence = done

After a successful merge the shards are removed (the dataset holds the same rows).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from tah.errors import InputError


def write_json(path: Path, value: dict) -> None:
    """Write `value` as JSON atomically (a reader sees the old file or the new, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextmanager
def quiet_datasets():
    """Without `datasets`' own progress bars (one per saved shard would drown ours)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class ShardStore:
    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.shards = self.out / "shards"
        self.dataset = self.out / "dataset"
        self.stats = self.out / "stats.json"
        self.manifest = self.out / "manifest.json"

    def shard(self, index: int) -> Path:
        return self.shards / f"shard-{index:05d}"

    def check_manifest(self, manifest: dict) -> None:
        """Raise if OUT holds a run started with other settings or other data."""
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} is a file; give a directory")
        if not self.manifest.exists():
            if self.out.is_dir() and any(self.out.iterdir()):
                raise InputError(f"--out {self.out} is a non-empty directory that is not a labelling run; "
                                 "give a new or empty directory")
            return
        old = json.loads(self.manifest.read_text())
        changed = sorted(key for key in set(old) | set(manifest) if old.get(key) != manifest.get(key))
        if changed:
            diffs = ", ".join(f"{key}: {old.get(key)!r} then, {manifest.get(key)!r} now" for key in changed)
            raise InputError(f"{self.out} holds a labelling run with other settings or data ({diffs}); rerun "
                             "with the same ones to resume, or give a fresh --out")

    def claim(self, manifest: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.manifest.exists():
            write_json(self.manifest, manifest)
        self.shards.mkdir(exist_ok=True)

    def done(self) -> bool:
        return self.stats.exists() and self.dataset.is_dir()

    def ready(self, index: int, rows: int) -> bool:
        """Whether shard `index` is on disk, loads, and holds `rows` rows. Removes a half-written temp
        dir of it, and a finished dir that does not load (it is then redone)."""
        import datasets

        tmp = self.shards / f".shard-{index:05d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        path = self.shard(index)
        if not path.exists():
            return False
        try:
            ok = datasets.load_from_disk(str(path)).num_rows == rows and self.counts(index)["rows"] == rows
        except Exception:  # any unreadable shard is simply redone
            ok = False
        if not ok:
            shutil.rmtree(path)
        return ok

    def counts(self, index: int) -> dict:
        return json.loads((self.shard(index) / "counts.json").read_text())

    def write(self, index: int, dataset, counts: dict) -> None:
        tmp = self.shards / f".shard-{index:05d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        with quiet_datasets():
            dataset.save_to_disk(str(tmp))
        (tmp / "counts.json").write_text(json.dumps(counts, sort_keys=True))
        os.rename(tmp, self.shard(index))

    def merge(self, num_shards: int) -> list[dict]:
        """Concatenate the shards into OUT/dataset (unless a previous run got that far) and return
        their counts; the shards stay until `cleanup`."""
        import datasets

        counts = [self.counts(index) for index in range(num_shards)]
        if not self.dataset.is_dir():
            tmp = self.out / ".dataset.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            parts = [datasets.load_from_disk(str(self.shard(index))) for index in range(num_shards)]
            with quiet_datasets():
                datasets.concatenate_datasets(parts).save_to_disk(str(tmp))
            os.rename(tmp, self.dataset)
        return counts

    def cleanup(self) -> None:
        shutil.rmtree(self.shards, ignore_errors=True)
