"""Decode cost of real-size chest X-ray files, and what the resized cache saves.

    python benchmarks/bench_images.py [--n 20] [--short-side 112]

Writes ``n`` synthetic MIMIC-CXR-JPG-sized images (3056 x 2544, JPEG quality 95, a smooth
anatomy-like pattern plus noise) and a 12-bit DICOM of the same size to a temporary folder, then
prints milliseconds per image: decoding the JPG, the DICOM, and reading the cached copy at the
encoder's short side (``cxrlib.data.sources.images.ImageStore``). File sizes are printed too.
The images are synthetic: real JPGs compress differently, so treat the sizes as estimates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrlib.data.sources.images import ImageStore

H, W = 3056, 2544  # a common MIMIC-CXR PA size


def synthetic(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    base = 120 + 60 * np.sin(xx / 180.0) * np.cos(yy / 240.0)
    return np.clip(base + rng.normal(0, 12, (H, W)), 0, 255).astype(np.uint8)


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def timed(store: ImageStore, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        store[i]
    return 1000 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--short-side", type=int, default=112)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = synthetic(rng)
        jpgs = []
        for i in range(args.n):
            jpgs.append(tmp / f"{i}.jpg")
            Image.fromarray(np.roll(image, i * 7, axis=1)).save(jpgs[-1], quality=95)
        dicoms = [tmp / f"{i}.dcm" for i in range(min(args.n, 5))]
        for p in dicoms:
            write_dicom(p, image)
        jpg_mb = np.mean([p.stat().st_size for p in jpgs]) / 1e6
        dcm_mb = np.mean([p.stat().st_size for p in dicoms]) / 1e6
        print(f"image {H}x{W}: JPG {jpg_mb:.2f} MB, uncompressed DICOM {dcm_mb:.2f} MB")
        print(f"decode JPG       {timed(ImageStore(jpgs), args.n):8.1f} ms/image")
        print(f"decode DICOM     {timed(ImageStore(dicoms), len(dicoms)):8.1f} ms/image")
        cached = ImageStore(jpgs, tmp / "cache", args.short_side)
        print(f"first epoch      {timed(cached, args.n):8.1f} ms/image (decode + resize + write)")
        print(f"cached epochs    {timed(cached, args.n):8.1f} ms/image "
              f"(short side {args.short_side})")  # fmt: skip
        cache_kb = np.mean([p.stat().st_size for p in (tmp / "cache").rglob("*.png")]) / 1e3
        print(f"cached copy      {cache_kb:8.1f} kB/image")


if __name__ == "__main__":
    main()
