"""Makes bench/verify_plot.png, the README's picture of `verify --plot`.

    python bench/verify_plot.py

Converts fixtures/seed1_loop to scan form, changes one element of layer 1's
Dense_0 kernel by 1e-3, and plots verify's comparison of the two forms: layer
1 fails where the changed kernel is used, and layer 2, which takes layer 1's
output, fails everywhere; layer 0 passes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ckptconv

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scan, bad = Path(tmp) / "scan", Path(tmp) / "scan_bad"
        ckptconv.convert(ROOT / "fixtures" / "seed1_loop", scan, to="scan")
        tree = ckptconv.load(scan)
        tree["params"]["blocks"]["Dense_0"]["kernel"][1, 3, 5] += 1e-3
        ckptconv.save(tree, bad, format="orbax")
        report = ckptconv.verify(
            ROOT / "fixtures" / "seed1_loop", bad, block="ckptconv.models:NormAttentionBlock",
            block_kwargs={"hidden_dim": 16, "num_heads": 2}, input_shape=(2, 8, 16),
            plot=Path(__file__).with_name("verify_plot.png"), repeats=0,
        )
    print("passed:", report.passed, "first failing layer:", report.first_bad_layer)


if __name__ == "__main__":
    main()
