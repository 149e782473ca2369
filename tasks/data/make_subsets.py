"""Rebuild the prompt files shipped in ``tasks/data/`` from the shared normalized files.

Build-time only: the harness never runs this script and never reads the source folder.

    python tasks/data/make_subsets.py --source /path/to/source/prompt/files
    sha256sum -c tasks/data/checksums.sha256   # run inside tasks/data/

Small files (< 1.5 MB) are copied byte for byte. Large files are cut to a deterministic
500-row subset whose lines are copied byte for byte from the source (no re-serialization),
so every shipped line can be found verbatim in its source file. Finally checksums.sha256 is
rewritten over every shipped ``*.jsonl`` file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_COPY_BYTES = 1_500_000
N_SUBSET = 500

# Shipped unchanged (each is < 1.5 MB).
COPIES = [
    "sdv1_500_memorized_labeled.jsonl",
    "nonmem_laion_500_nemo.jsonl",
    "nonmem_sail_sd1_mixed_500.jsonl",
    "webster_sdv2_memorized_219.jsonl",
]


def lexica_first_500(lines: list[bytes]) -> list[bytes]:
    """Gustavosta test split in file order, first 500 rows (Wen et al.: ``--end 500``)."""
    return lines[:N_SUBSET]


def coco_first_caption_per_image(lines: list[bytes]) -> list[bytes]:
    """COCO 2017 val: first caption of each image_id in file order, first 500 images.

    One caption per image is MemBench's ``drop_duplicates(subset='image_id')``; it keeps
    500 distinct images instead of 100 images with 5 near-paraphrases each.
    """
    seen: set[int] = set()
    out: list[bytes] = []
    for line in lines:
        image_id = json.loads(line)["image_id"]
        if image_id in seen:
            continue
        seen.add(image_id)
        out.append(line)
        if len(out) == N_SUBSET:
            break
    return out


# output name -> (source name, selection rule)
SUBSETS = {
    "nonmem_lexica_gustavosta_test_500.jsonl": (
        "nonmem_lexica_gustavosta_test_8192.jsonl", lexica_first_500),
    "nonmem_coco2017_val_500.jsonl": (
        "nonmem_coco2017_val_captions.jsonl", coco_first_caption_per_image),
}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="folder holding the normalized *.jsonl files")
    args = parser.parse_args()
    src: Path = args.source
    for name in COPIES:
        size = (src / name).stat().st_size
        if size >= MAX_COPY_BYTES:
            raise SystemExit(f"{name} is {size} bytes; add a subset rule instead of copying")
        shutil.copyfile(src / name, HERE / name)
        print(f"copied  {name} ({size} bytes)")
    for out_name, (src_name, rule) in SUBSETS.items():
        lines = (src / src_name).read_bytes().splitlines(keepends=True)
        chosen = rule(lines)
        if len(chosen) != N_SUBSET:
            raise SystemExit(f"{src_name}: expected {N_SUBSET} rows, got {len(chosen)}")
        (HERE / out_name).write_bytes(b"".join(chosen))
        print(f"subset  {out_name} <- {src_name} (sha256 {sha256_file(src / src_name)})")
    shipped = sorted(p for p in HERE.glob("*.jsonl"))
    text = "".join(f"{sha256_file(p)}  {p.name}\n" for p in shipped)
    (HERE / "checksums.sha256").write_text(text, encoding="utf-8")
    print(f"wrote checksums.sha256 over {len(shipped)} files")


if __name__ == "__main__":
    main()
