"""The one GPU script: build csrc/, check, sanitize, benchmark, print the tables.

Run from the repository root on a CUDA machine (e.g. the lent H100/H200):

    PYTHONUNBUFFERED=1 python bench/run_gpu.py --out "$OUT"            # everything
    python bench/run_gpu.py --skip-build --only bench                   # just the benchmarks

Steps (each failure is reported and the next step still runs; exit code != 0 if any failed):
1. build: ``pip install --no-build-isolation --no-deps -e .`` (CUDA archs from
   FREE_KERNELS_CUDA_ARCHS, default 80;90), then ``python -m free_kernels.info``;
2. tests: the whole suite on the GPU (``pytest -q tests``; GPU tests carry the ``gpu`` marker);
3. sanitize: ``compute-sanitizer --tool memcheck`` (and racecheck) on one small call of every
   CUDA/Triton kernel (bench/sanitize_cases.py);
4. bench: verify attention, speculative accept, drafter step, and the demo end-to-end
   benchmark, each writing JSON under --out; the tables are printed last.
Record the printed tables with the device, driver and versions in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, log, env=None, timeout=None):
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout)
        f.write(p.stdout)
    tail = p.stdout[-4000:]
    print(tail, flush=True)
    print(f"[exit {p.returncode}, {time.time() - t0:.0f} s]", flush=True)
    return p.returncode, p.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--only", default="build,tests,sanitize,bench")
    ap.add_argument("--quick", action="store_true", help="smaller benchmark grids")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "run_gpu.log")
    steps = set(args.only.split(","))
    failed = []
    py = sys.executable
    if "build" in steps and not args.skip_build:
        rc, _ = sh([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], log)
        if rc:
            failed.append("build")
    rc, _ = sh([py, "-m", "free_kernels.info"], log)
    if "tests" in steps:
        rc, _ = sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-x", "--durations=15"], log,
                   timeout=1800)
        if rc:
            failed.append("tests")
    if "sanitize" in steps:
        cs = shutil.which("compute-sanitizer")
        if cs is None:
            print("compute-sanitizer not found: sanitize step skipped")
        else:
            for tool in ("memcheck", "racecheck"):
                rc, _ = sh([cs, "--tool", tool, "--error-exitcode", "3", py, "bench/sanitize_cases.py"], log,
                           env={"FREE_KERNELS_CHECK_NAN": "0"}, timeout=900)
                if rc:
                    failed.append(f"sanitize:{tool}")
    tables = []
    if "bench" in steps:
        q = ["--quick"] if args.quick else []
        for name, cmd in (
            ("verify_attention", [py, "bench/bench_verify_attention.py", "--json",
                                  os.path.join(args.out, "verify_attention.json"), *q]),
            ("speculative_accept", [py, "bench/bench_speculative_accept.py", "--json",
                                    os.path.join(args.out, "speculative_accept.json"), *q]),
            ("drafter", [py, "bench/bench_drafter.py", "--json", os.path.join(args.out, "drafter.json"), *q]),
            ("demo", [py, "bench/bench_demo.py", "--out", os.path.join(args.out, "demo.json"),
                      *(["--quick"] if args.quick else [])]),
            ("e2e", [py, "bench/bench_e2e.py", "--xl", "--json", os.path.join(args.out, "e2e.json")]),
        ):
            rc, out = sh(cmd, log, env={"FREE_KERNELS_CHECK_NAN": "0"}, timeout=1800)
            tables.append((name, out))
            if rc:
                failed.append(f"bench:{name}")
    print("\n================ tables ================")
    for name, out in tables:
        print(f"\n### {name}\n")
        print("\n".join(line for line in out.splitlines() if line.startswith(("|", "#", "device", "torch"))))
    print(f"\nfailed steps: {failed or 'none'}; full log: {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
