"""Stage `synthesize`: write the embedded synthetic corpus in the seven datasets' official layouts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mflag.params import load_or_exit
from mflag.synth.corpus import generate


def main() -> None:
    params = load_or_exit()
    out = Path(params.synthetic.out_dir)
    start = time.perf_counter()
    counts = generate(params.synthetic, out)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": counts, "total": sum(counts.values()), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
