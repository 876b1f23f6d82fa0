"""The one GPU script: build csrc/, check, test, smoke-sample, benchmark, sanitize, in a budget.

Run from the repository root on the CUDA machine (an H200 lent in slices of minutes):

    PYTHONUNBUFFERED=1 python bench/run_gpu.py --out "$OUT" --budget 480
    python bench/run_gpu.py --out "$OUT" --only smoke,bench:     # a subset (prefix match), no build:
                                                                 # only on a machine still warm from a build
    python bench/run_gpu.py --out "$OUT" --only preflight,build,cuda-check,bench:e2e,sanitize  # a fresh machine
    python bench/run_gpu.py --out /tmp/dry --budget 8 --dry-run   # the orchestration on a CPU machine

What comes back from such a machine is the last 12,000 characters of the console and at most 8
files of at most 16 MiB from one folder.  So this script is built to return the most evidence
from ONE command whatever fails inside it:

* a global wall-clock ``--budget`` (seconds).  Every step runs in its own process group
  (``start_new_session``) with its own deadline, min(its limit, what is left of the budget minus
  a reserve for the summary); at the deadline the whole group gets SIGTERM, then SIGKILL;
* a step's output streams, as it is produced, into ``DIR/steps.log`` (per step: the first
  ``--log-head`` bytes as they come, the last ``--log-tail`` bytes when the step ends, an
  omission marker between) and compactly to the console (first lines, failures, table rows,
  last lines; every line cut to 200 characters);
* ``DIR/summary.json`` (per step: status ok / failed / killed / skipped, seconds, exit code,
  key figures parsed from its output) is rewritten atomically after every step;
* a failing or killed step never stops the rest; the exit code is 1 if any step did not pass;
* the LAST thing printed is a compact summary table;
* SIGTERM, SIGINT and SIGHUP (a command time limit, Ctrl-C, a closed terminal) stop the run, not just
  this process: the running step's whole group gets SIGTERM, then SIGKILL after ``--grace`` seconds,
  the step is recorded as ``interrupted``, the steps not reached as ``skipped``, the scratch folder is
  removed, the final summary (``"interrupted": "SIGTERM"``) and table are written, and the exit code is
  128 + the signal number (143, 130, 129).  A second signal during that clean-up is ignored.

Files written to DIR (at most 8, none in sub-folders, each at most 16 MiB): ``summary.json``,
``steps.log``, ``bench.json`` (the benchmarks' ``--json`` documents merged under their step
names), ``backend_priority.json`` (when bench/update_priority.py exists).  The benchmarks write
their own JSON into a scratch folder outside DIR first.

Steps, in order of value (``--list`` prints them with their limits):

 1. ``preflight``  GPU name and driver (nvidia-smi), nvcc, Python package versions (torch,
    triton, numpy, scipy, safetensors, pybind11, cmake, ninja) read without importing them,
    compute-sanitizer and ncu presence.  Never fails for something missing.
 2. ``build``      CMake + Ninja directly, sm_90 only (``FREE_KERNELS_CUDA_ARCHS``, default 90),
    all cores (``--parallel $(nproc)``, ``FREE_KERNELS_NVCC_THREADS`` 1), into
    ``build/cmake/gpu-sm<archs>`` with the module written to ``free_kernels/`` - the same CMake
    invocation setup.py makes, without pip's overhead (no metadata, no wheel, no isolation).
    The alternative is a prebuilt extension: csrc/ does not include torch, so ``_C`` could be
    built on the CPU machine for the GPU machine's Python (3.12) and carried over.  It was not
    chosen: it needs a Python 3.12 with pybind11 on the CPU machine, a second build flavour to
    keep in step with every csrc/ change, and it saves only the ~1-2 minutes that a 16-core
    sm_90-only build takes; it also would not prove that the tree builds on the target.
 3. ``cuda-check`` ``python bench/gpu_smoke.py check``: ``free_kernels.info`` must show torch with
    CUDA, the extension built with CUDA for the device's arch, and every op resolving to ``cuda``
    on CUDA fp16 tensors; fails loudly with the reasons otherwise.
 4. ``tests:<file>`` the GPU tests, one pytest process per test file that has GPU cases, kernel
    files first, no ``-x``.  tests/conftest.py: ``FREE_KERNELS_GPU_CASES_ONLY=1`` keeps only the
    gpu-marked tests and those whose name or parameters name a ``cuda`` / ``triton`` backend, and
    ``FREE_KERNELS_REQUIRE_GPU=1`` turns a skip of such a case into a failure.
 5. ``smoke:cuda``, ``smoke:triton`` the demo DiT sampled with FREE on the GPU, the ops forced
    to one backend: steps per target call and acceptance by thirds
    against the CPU figures, and a two-sample KS test against the baseline ``p_sample_loop``
    (every op that has the backend forced to it with ``FREE_KERNELS_BACKEND_<OP>``).
 6. ``bench:verify_attention``, ``bench:speculative_accept``, ``bench:drafter`` the
    microbenchmarks in quick mode, without torch.compile; ``priority`` then runs
    ``bench/update_priority.py`` on their JSON when that script exists (else skipped).
 7. ``bench:e2e``  demo model and DiT-XL/2 shapes at 256 px, batch 1 / 4 / 16, with
    ``FREE_KERNELS_PRIORITY_FILE`` pointing at the table just measured (the default order if none).
 8. ``sanitize:memcheck``, ``sanitize:racecheck`` compute-sanitizer on one small call of every
    CUDA kernel (bench/sanitize_cases.py), last and time-boxed.

``--dry-run`` runs the same orchestration with stand-in steps (one that succeeds, one that
fails, one that floods its output, one that hangs with a child process, one that eats the rest
of the budget, one left without budget); tests/test_run_gpu.py checks it in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

MAX_FILE_BYTES = 16 * 1024 * 1024
LOG_HARD_CAP = 15 * 1024 * 1024   # steps.log never grows past this, even if the run is cut short
LOG_HEAD_CAP = 14 * 1024 * 1024   # step heads stop here, leaving room for the tails
CONSOLE_LINE = 200          # characters per echoed line
CONSOLE_HEAD_LINES = 6      # first lines of a step echoed as they come
CONSOLE_MATCH_LINES = 40    # further lines echoed when they match ECHO (per step)
CONSOLE_TAIL_LINES = 6      # last lines of a step echoed when it ends
ECHO = re.compile(r"FAIL|ERROR|Error|error:|Traceback|KILLED|passed|failed|^\s*\||ratio|speed-up|x eager|"
                  r"SMOKE|KS |steps/call|========= (ERROR|Invalid|Race)")


# ----------------------------------------------------------------------------- steps
@dataclass
class Step:
    name: str
    cmd: object                                   # argv list, or a callable -> (argv or None, why not)
    limit: float                                  # seconds, before the budget cut
    env: Dict[str, str] = field(default_factory=dict)
    parse: Optional[Callable[[str, "Step"], Dict]] = None  # (log text kept in memory, step) -> figures
    skip: Optional[str] = None                    # reason: the step is not run
    json_out: Optional[str] = None                # a --json file the step writes (merged into bench.json)
    ok_codes: tuple = (0,)


def _tail_text(text: str, n: int = 20000) -> str:
    return text[-n:]


def parse_pytest(text: str, step: Step) -> Dict:
    """Counts from pytest's last summary line; for a killed run, counts of the -v result words so far."""
    figs: Dict = {}
    last = None
    for line in text.splitlines():
        if re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b", line) and \
                re.search(r"=+ .* in [\d.]+s", line):
            last = line
    if last:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", last):
            figs[word.rstrip("s") if word.startswith("error") else word] = int(n)
    else:
        for word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            c = len(re.findall(rf" {word}\b", text))
            if c:
                figs[word.lower() + "_so_far"] = c
    fails = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    if fails:
        figs["first_failures"] = [f.split("::", 1)[-1][:80] for f in fails[:3]]
    return figs


def parse_marked_json(text: str, step: Step) -> Dict:
    """The last ``RESULT_JSON {...}`` line a step printed (gpu_smoke.py, the stand-ins)."""
    figs: Dict = {}
    for line in text.splitlines():
        if line.startswith("RESULT_JSON "):
            try:
                figs = json.loads(line[len("RESULT_JSON "):])
            except ValueError:
                pass
    return figs


def _load_json(path: Optional[str]):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, TypeError):
        return None


def _num(v, nd=3):
    return None if v is None else round(float(v), nd)


def parse_bench_attention(text: str, step: Step) -> Dict:
    doc = _load_json(step.json_out)
    rows = doc.get("rows", []) if isinstance(doc, dict) else []
    figs: Dict = {"rows": len(rows)}
    best = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (int, float)) and k.startswith(("x_", "ratio", "speedup")):
                key = f"{r.get('provider', '?')}:{k}"
                best[key] = max(best.get(key, float("-inf")), float(v))
    figs.update({k: _num(v) for k, v in sorted(best.items())[:6]})
    return figs


def parse_bench_accept(text: str, step: Step) -> Dict:
    doc = _load_json(step.json_out)
    rows = doc.get("rows", []) if isinstance(doc, dict) else []
    figs: Dict = {"rows": len(rows)}
    for r in rows:
        if r.get("provider") in ("cuda", "triton") and r.get("x_eager"):
            key = f"{r['provider']}:B{r.get('B')}L{r.get('L')}D{r.get('D')}:x_eager"
            figs[key] = _num(r["x_eager"], 1)
    if len(figs) > 7:
        figs = dict(list(figs.items())[:7])
    return figs


def parse_bench_generic(text: str, step: Step) -> Dict:
    doc = _load_json(step.json_out)
    if isinstance(doc, dict):
        rows = doc.get("rows")
        return {"rows": len(rows)} if isinstance(rows, list) else {"keys": sorted(doc)[:6]}
    return {}


def parse_round_graphs(text: str, step: Step) -> Dict:
    """Replay == eager and the replay speed-up per batch (bench_round_graphs.py)."""
    doc = _load_json(step.json_out)
    figs: Dict = {}
    for r in (doc or {}).get("rows", []) if isinstance(doc, dict) else []:
        b = r.get("batch")
        figs[f"b{b}_replay_equals_eager"] = r.get("replay_equals_eager")
        figs[f"b{b}_graph_speedup"] = _num(r.get("graph_speedup"), 2)
        figs[f"b{b}_graphs_ms_per_round"] = _num(r.get("graphs_ms_per_round"), 2)
    return figs


def parse_e2e(text: str, step: Step) -> Dict:
    doc = _load_json(step.json_out)
    figs: Dict = {}
    if not isinstance(doc, dict):
        return figs
    for r in doc.get("part1", []):
        if r.get("batch") == 1 and r.get("sampler") == "FREE (exact)":
            figs["demo_b1_measured_speedup"] = _num(r.get("speedup"), 2)
    for r in doc.get("part2", []):
        if r.get("batch") == 1 and r.get("L") == 6:
            figs[f"xl_t{r.get('tokens')}_b1_projection"] = _num(r.get("projection"), 2)
            figs[f"xl_t{r.get('tokens')}_b1_draft_over_target"] = _num(
                r["t_draft"] / r["t_step"] if r.get("t_step") else None, 3)
    return figs


def _priority_figures(path: str) -> Dict:
    doc = _load_json(path)
    entries = doc.get("entries", []) if isinstance(doc, dict) else []
    firsts: Dict[str, int] = {}
    for e in entries:
        if e.get("order"):
            firsts[e["order"][0]] = firsts.get(e["order"][0], 0) + 1
    return {"entries": len(entries), **{f"first_{k}": v for k, v in sorted(firsts.items())}}


def parse_preflight(text: str, step: Step) -> Dict:
    figs = parse_marked_json(text, step)
    keep = ("gpu", "driver", "nvcc", "torch", "triton", "compute-sanitizer", "ncu", "cpus")
    return {k: figs[k] for k in keep if k in figs}


def parse_sanitizer(text: str, step: Step) -> Dict:
    figs: Dict = {}
    m = re.findall(r"========= ERROR SUMMARY: (\d+) error", text)
    if m:
        figs["errors"] = int(m[-1])
    figs["cases_ok"] = len(re.findall(r"^ok\s", text, flags=re.M))
    figs["cases_failed"] = len(re.findall(r"^FAIL\s", text, flags=re.M))
    hazards = re.findall(r"========= (Invalid \w+ of size \d+|Race reported [^\n]{0,60}|Error: [^\n]{0,60})", text)
    if hazards:
        figs["first"] = hazards[0][:80]
    return figs


def _preflight_cmd() -> List[str]:
    # versions read from package metadata: nothing heavy is imported, nothing missing can fail it
    code = r"""
import importlib.metadata as md, json, os, platform, shutil, subprocess
def run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout or p.stderr).strip()
    except Exception as e:
        return f"unavailable ({type(e).__name__})"
out = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
smi = shutil.which("nvidia-smi")
if smi:
    q = run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    print("nvidia-smi:", q)
    parts = [p.strip() for p in q.splitlines()[0].split(",")] if q else []
    out["gpu"] = parts[0] if parts else q
    out["driver"] = parts[1] if len(parts) > 1 else None
    out["gpu_memory"] = parts[2] if len(parts) > 2 else None
    out["compute_cap"] = parts[3] if len(parts) > 3 else None
else:
    out["gpu"] = "no nvidia-smi"
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
out["nvcc"] = run([nvcc, "--version"]).splitlines()[-1] if nvcc else "missing"
for pkg in ("torch", "triton", "numpy", "scipy", "safetensors", "pybind11", "cmake", "ninja", "pytest"):
    try:
        out[pkg] = md.version(pkg)
    except Exception:
        out[pkg] = "missing"
for tool in ("cmake", "ninja"):
    exe = shutil.which(tool)
    out[tool + "_bin"] = run([exe, "--version"]).splitlines()[0] if exe else "missing"
cuda_bins = [os.path.dirname(nvcc)] if nvcc else []
for tool in ("compute-sanitizer", "ncu", "nsys"):
    exe = shutil.which(tool) or next((os.path.join(d, tool) for d in cuda_bins
                                      if os.path.exists(os.path.join(d, tool))), None)
    out[tool] = exe or "missing"
for k, v in out.items():
    print(f"{k}: {v}")
print("RESULT_JSON " + json.dumps(out))
"""
    return [PY, "-c", code]


def _build_cmd(archs: str) -> List[str]:
    flavour = "gpu-sm" + re.sub(r"[^0-9a-z]+", "_", archs)
    build_dir = os.path.join(ROOT, "build", "cmake", flavour)
    out_dir = os.path.join(ROOT, "free_kernels")
    script = f"""
set -e
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
CMAKE=$(command -v cmake || {PY} -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))')
GEN=""
if command -v ninja >/dev/null || {PY} -c 'import ninja' 2>/dev/null; then
  NINJA=$(command -v ninja || {PY} -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))')
  GEN="-G Ninja -DCMAKE_MAKE_PROGRAM=$NINJA"
fi
echo "cmake: $CMAKE  nvcc: $NVCC  generator: ${{GEN:-default}}  jobs: $(nproc)  archs: {archs}"
"$CMAKE" -S "{ROOT}" -B "{build_dir}" $GEN -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="{PY}" \\
  -DFREE_KERNELS_OUTPUT_DIR="{out_dir}" -DFREE_KERNELS_BUILD_EXTENSION=ON -DFREE_KERNELS_BUILD_TESTS=OFF \\
  -DFREE_KERNELS_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="{archs}" \\
  -DFREE_KERNELS_NVCC_THREADS=1
"$CMAKE" --build "{build_dir}" --config Release --target _C --parallel "$(nproc)"
ls -l "{out_dir}"/_C*.so
"""
    return ["bash", "-c", script]


FIRST_TEST_FILES = ("test_speculative_accept", "test_verify_attention", "test_draft_epilogue", "test_modulated_layernorm",
                    "test_gated_residual", "test_bias_gelu", "test_fused_drafter", "test_build")
TEST_LIMITS = {"test_speculative_accept": 90, "test_verify_attention": 90, "test_draft_epilogue": 90,
               "test_modulated_layernorm": 60, "test_fused_drafter": 60}


def gpu_test_files() -> List[str]:
    """Test files with GPU cases (a ``gpu`` marker or a ``cuda`` backend parameter), kernel files first."""
    found = []
    for dirpath, _dirs, files in os.walk(os.path.join(ROOT, "tests")):
        for f in sorted(files):
            if f.startswith("test_") and f.endswith(".py"):
                path = os.path.join(dirpath, f)
                try:
                    text = open(path, encoding="utf-8", errors="replace").read()
                except OSError:
                    continue
                if "mark.gpu" in text or '"cuda"' in text or "'cuda'" in text:
                    found.append(os.path.relpath(path, ROOT))
    rank = {name: i for i, name in enumerate(FIRST_TEST_FILES)}
    return sorted(found, key=lambda p: (rank.get(os.path.basename(p)[:-3], len(rank)), p))


def gpu_steps(args, scratch: str) -> List[Step]:
    env_bench = {"FREE_KERNELS_CHECK_NAN": "0"}
    steps: List[Step] = [
        Step("preflight", _preflight_cmd(), 30, parse=parse_preflight),
        Step("build", _build_cmd(args.archs), 240),
        Step("cuda-check", [PY, "bench/gpu_smoke.py", "check"], 60, parse=parse_marked_json),
    ]
    for path in gpu_test_files():
        stem = os.path.basename(path)[:-3]
        name = "tests:" + stem[len("test_"):]
        steps.append(Step(name, [PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", "--durations=5", path],
                          TEST_LIMITS.get(stem, 45),
                          env={"FREE_KERNELS_REQUIRE_GPU": "1", "FREE_KERNELS_GPU_CASES_ONLY": "1",
                               "FREE_KERNELS_CUDA_ARCHS": args.archs},
                          parse=parse_pytest, ok_codes=(0, 5)))
    for backend in ("cuda", "triton"):
        steps.append(Step(f"smoke:{backend}", [PY, "bench/gpu_smoke.py", "sample", "--backend", backend], 120,
                          parse=parse_marked_json))
    js_graphs = os.path.join(scratch, "round_graphs.json")
    steps.append(Step("bench:round_graphs", [PY, "bench/bench_round_graphs.py", "--batch", "1", "--batch", "16",
                                             "--steps", "100", "--json", js_graphs], 120,
                      env=env_bench, parse=parse_round_graphs, json_out=js_graphs))
    benches = [("verify_attention", ["--quick"], parse_bench_attention),
               ("speculative_accept", ["--quick", "--no-compile"], parse_bench_accept),
               ("drafter", ["--quick", "--no-compile"], parse_bench_generic)]
    jsons = []
    for name, extra, parse in benches:
        js = os.path.join(scratch, f"{name}.json")
        jsons.append(js)
        steps.append(Step(f"bench:{name}", [PY, f"bench/bench_{name}.py", "--json", js, *extra], 120,
                          env=env_bench, parse=parse, json_out=js))
    upd = os.path.join(ROOT, "bench", "update_priority.py")

    prio_out = os.path.join(args.out, "backend_priority.json")

    def priority_cmd():
        have = [j for j in jsons if os.path.exists(j)]
        if not have:
            return None, "no benchmark JSON to read"
        return [PY, upd, "--out", prio_out, *have], None

    steps.append(Step("priority", priority_cmd, 30, parse=lambda text, st: _priority_figures(prio_out),
                      skip=None if os.path.exists(upd) else "bench/update_priority.py not present"))
    js = os.path.join(scratch, "e2e.json")
    prio = os.path.join(args.out, "backend_priority.json")
    steps.append(Step("bench:e2e", [PY, "bench/bench_e2e.py", "--xl", "--quick", "--batches", "1,4,16",
                                    "--json", js], 150, parse=parse_e2e, json_out=js,
                      # the dispatcher then uses the order just measured (absent file: the default order)
                      env={**env_bench, "FREE_KERNELS_PRIORITY_FILE": prio}))
    cs = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    for tool in ("memcheck", "racecheck"):
        steps.append(Step(f"sanitize:{tool}", [cs or "compute-sanitizer", "--tool", tool, "--error-exitcode", "3",
                                               "--target-processes", "all", PY, "bench/sanitize_cases.py"],
                          120, env={"FREE_KERNELS_CHECK_NAN": "0"}, parse=parse_sanitizer,
                          skip=None if cs else "compute-sanitizer not found"))
    return steps


def dry_steps(args, scratch: str) -> List[Step]:
    """Stand-ins exercising every path of the orchestration on a CPU machine (tests/test_run_gpu.py)."""
    flood_bytes = int(args.flood_bytes)
    js = os.path.join(scratch, "standin.json")
    hang = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)'])\n"
            "print('hang: child pid', child.pid, flush=True)\n"
            "print('hang: parent pid', os.getpid(), flush=True)\n"
            "signal_ignored = __import__('signal').signal(__import__('signal').SIGTERM, lambda *a: None)\n"
            "time.sleep(1000)\n")
    return [
        Step("preflight", _preflight_cmd(), 10, parse=parse_preflight),
        Step("ok", [PY, "-c", "import json; print('ok: hello'); print('| a | b |'); "
                              f"json.dump({{'rows': [1, 2, 3]}}, open({js!r}, 'w')); "
                              "print('RESULT_JSON ' + json.dumps({'answer': 42}))"], 10,
             parse=parse_marked_json, json_out=js),
        Step("fails", [PY, "-c", "import sys; print('about to fail'); "
                                 "print('Traceback: stand-in failure', file=sys.stderr); sys.exit(3)"], 10),
        Step("flood", [PY, "-c", "import sys\nline = 'x' * 999 + '\\n'\n"
                                 f"for i in range({flood_bytes} // 1000):\n"
                                 "    sys.stdout.write(line)\n"
                                 "sys.stdout.write('y' * 300000)\n"       # one long line without newline
                                 "print('\\nflood: done')"], 20),
        Step("hang", [PY, "-c", hang], args.hang_limit),
        Step("priority", [PY, os.path.join(ROOT, "bench", "no_such_script.py")], 10,
             skip="bench/no_such_script.py not present"),
        Step("budget-hog", [PY, "-c", "import time; print('hog: sleeping', flush=True); time.sleep(1000)"], 1000),
        Step("late", [PY, "-c", "print('never runs')"], 10),
    ]


# ----------------------------------------------------------------------------- runner
class Runner:
    def __init__(self, args, signals: Optional[List[int]] = None):
        self.args = args
        self.signals = signals if signals is not None else []  # filled by _trap_signals' handler
        self.out = args.out
        self.t0 = time.monotonic()
        self.budget = float(args.budget)
        self.grace = float(args.grace)
        self.reserve = max(self.grace + 0.5, min(10.0, 0.03 * self.budget))
        self.log_path = os.path.join(self.out, "steps.log")
        self.summary_path = os.path.join(self.out, "summary.json")
        self.bench_path = os.path.join(self.out, "bench.json")
        self.results: List[Dict] = []
        self.bench: Dict = {}
        self.log = open(self.log_path, "ab")
        self.log_bytes = self.log.tell()

    @property
    def stop(self) -> Optional[int]:
        """The signal that interrupted the run, or None."""
        return self.signals[0] if self.signals else None

    # -- console
    @staticmethod
    def say(msg: str) -> None:
        for line in msg.splitlines() or [""]:
            print(line[:CONSOLE_LINE], flush=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    # -- files
    def _atomic_json(self, path: str, doc) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, path)

    def write_summary(self, final: bool = False) -> None:
        doc = dict(command=" ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]) if sys.argv else "",
                   budget_s=self.budget, elapsed_s=round(time.monotonic() - self.t0, 2), final=final,
                   dry_run=bool(self.args.dry_run), steps=self.results)
        if self.stop is not None:
            doc["interrupted"] = _signame(self.stop)
        self._atomic_json(self.summary_path, doc)

    def _log_write(self, data: bytes) -> None:
        room = LOG_HARD_CAP - self.log_bytes
        if room <= 0:
            return
        data = data[:room]
        self.log.write(data)
        self.log.flush()
        self.log_bytes += len(data)

    # -- one step
    def run_step(self, step: Step) -> Dict:
        res = dict(step=step.name, status="skipped", seconds=0.0, rc=None, figures={})
        if self.stop is not None:
            step.skip = f"run_gpu interrupted by {_signame(self.stop)}"
        if step.skip:
            res["reason"] = step.skip
            self.say(f"[{step.name}] skipped: {step.skip}")
            self._log_write(f"\n===== {step.name}: skipped ({step.skip})\n".encode())
            return res
        if callable(step.cmd):  # decided when the step is reached (e.g. which JSON files exist by then)
            cmd, why = step.cmd()
            if cmd is None:
                res["reason"] = why
                self.say(f"[{step.name}] skipped: {why}")
                self._log_write(f"\n===== {step.name}: skipped ({why})\n".encode())
                return res
            step.cmd = cmd
        allowed = min(step.limit, self.left() - self.reserve)
        if allowed < self.args.min_step:
            res["reason"] = f"budget exhausted ({max(0.0, self.left()):.1f} s left)"
            self.say(f"[{step.name}] skipped: {res['reason']}")
            self._log_write(f"\n===== {step.name}: skipped ({res['reason']})\n".encode())
            return res
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        header = f"\n===== {step.name}: $ {' '.join(step.cmd)[:2000]}\n      limit {allowed:.0f} s\n"
        self._log_write(header.encode())
        self.say(f"[{step.name}] start (limit {allowed:.0f} s)")
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            res.update(status="failed", reason=f"could not start: {e}")
            self.say(f"[{step.name}] failed to start: {e}")
            self._log_write(f"could not start: {e}\n".encode())
            return res
        state = dict(head_left=int(self.args.log_head), omitted=0, tail=bytearray(), console_head=0,
                     console_match=0, last_lines=[], text=[], text_len=0, partial=b"")
        reader = threading.Thread(target=self._pump, args=(proc, step, state), daemon=True)
        reader.start()
        killed = interrupted = False
        deadline = t0 + max(0.1, allowed)
        while True:  # in slices, so that a signal to this process is acted on within a fraction of a second
            if self.stop is not None:
                interrupted = True
                self._kill_group(proc, step.name, f"interrupted by {_signame(self.stop)}")
                break
            try:
                proc.wait(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    killed = True
                    self._kill_group(proc, step.name, "deadline reached")
                    break
        # leftovers of the group (children of a finished step) must not keep the pipe open
        self._signal_group(proc.pid, signal.SIGKILL)
        reader.join(timeout=self.grace + 2)
        self._finish_log(step, state)
        dt = time.monotonic() - t0
        text = b"".join(state["text"]).decode("utf-8", "replace")
        res.update(seconds=round(dt, 2), rc=proc.returncode)
        if interrupted:
            res["status"] = "interrupted"
            res["reason"] = f"run_gpu interrupted by {_signame(self.stop)}"
        elif killed:
            res["status"] = "killed"
            res["reason"] = f"deadline {allowed:.0f} s"
        else:
            res["status"] = "ok" if proc.returncode in step.ok_codes else "failed"
        try:
            res["figures"] = step.parse(text, step) if step.parse else {}
        except Exception as e:  # a parser bug must not lose the step
            res["figures"] = {"parse_error": f"{type(e).__name__}: {e}"[:120]}
        if step.json_out:
            doc = _load_json(step.json_out)
            if doc is not None:
                self.bench[step.name.split(":", 1)[-1]] = doc
                self._atomic_json(self.bench_path, self.bench)
        for line in state["last_lines"][-CONSOLE_TAIL_LINES:]:
            self.say(f"[{step.name}] . {line}")
        self.say(f"[{step.name}] {res['status'].upper()} rc={res['rc']} in {dt:.1f} s "
                 f"{_fmt_figs(res['figures'], 120)}")
        return res

    def _pump(self, proc, step: Step, state: Dict) -> None:
        fd = proc.stdout.fileno()
        keep = int(self.args.parse_keep)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            # file: head as it comes, then a bounded tail
            head_room = min(state["head_left"], LOG_HEAD_CAP - self.log_bytes)
            if head_room > 0:
                w = chunk[:head_room]
                self._log_write(w)
                state["head_left"] -= len(w)
                rest = chunk[len(w):]
            else:
                rest = chunk
            if rest:
                state["omitted"] += len(rest)
                state["tail"] += rest
                cap = int(self.args.log_tail)
                if len(state["tail"]) > cap:
                    del state["tail"][: len(state["tail"]) - cap]
            # memory for the parsers: the last `keep` bytes
            state["text"].append(chunk)
            state["text_len"] += len(chunk)
            while state["text_len"] > keep and len(state["text"]) > 1:
                state["text_len"] -= len(state["text"].pop(0))
            # console: whole lines only
            data = state["partial"] + chunk
            lines = data.split(b"\n")
            state["partial"] = lines.pop()
            if lines and state.get("runaway"):  # the end of a runaway line already shown
                lines.pop(0)
                state["runaway"] = False
            if len(state["partial"]) > 4096:  # a runaway line: show its start once, drop the rest
                if not state.get("runaway"):
                    lines.append(state["partial"][:CONSOLE_LINE] + b" [long line cut]")
                state["runaway"] = True
                state["partial"] = b""
            for raw in lines:
                self._console_line(step, state, raw.decode("utf-8", "replace").rstrip("\r"))
        if state["partial"]:
            self._console_line(step, state, state["partial"].decode("utf-8", "replace")[:CONSOLE_LINE])
        try:
            proc.stdout.close()
        except OSError:
            pass

    def _console_line(self, step: Step, state: Dict, line: str) -> None:
        state["last_lines"].append(line[:CONSOLE_LINE])
        if len(state["last_lines"]) > CONSOLE_TAIL_LINES:
            state["last_lines"].pop(0)
        if not line.strip():
            return
        if state["console_head"] < CONSOLE_HEAD_LINES:
            state["console_head"] += 1
            self.say(f"[{step.name}] {line}")
            state["last_lines"].pop()  # already shown
        elif state["console_match"] < CONSOLE_MATCH_LINES and ECHO.search(line):
            state["console_match"] += 1
            self.say(f"[{step.name}] {line}")
            state["last_lines"].pop()
            if state["console_match"] == CONSOLE_MATCH_LINES:
                self.say(f"[{step.name}] (further lines only in steps.log)")

    def _finish_log(self, step: Step, state: Dict) -> None:
        tail = bytes(state["tail"])
        if state["omitted"] > len(tail):
            self._log_write(f"\n[... {state['omitted'] - len(tail)} bytes of {step.name} omitted ...]\n".encode())
        self._log_write(tail)
        if state["partial"]:
            self._log_write(b"\n")

    @staticmethod
    def _signal_group(pid: int, sig) -> bool:
        try:
            os.killpg(pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _kill_group(self, proc, name: str, why: str) -> None:
        self.say(f"[{name}] {why}: SIGTERM to process group {proc.pid}")
        self._log_write(f"\n[run_gpu: {why}, SIGTERM to process group {proc.pid}]\n".encode())
        self._signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            self._log_write(f"[run_gpu: SIGKILL to process group {proc.pid}]\n".encode())
            self._signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                pass

    # -- all steps
    def run(self, steps: List[Step]) -> int:
        """Run ``steps``; 0 if every step passed, 1 if one did not, 128 + N when signal N interrupted the run."""
        self.say(f"run_gpu: {len(steps)} steps, budget {self.budget:.0f} s, out {self.out}"
                 f"{' (dry run)' if self.args.dry_run else ''}")
        for st in steps:
            try:
                res = self.run_step(st)
            except Exception as e:  # the orchestrator itself must survive anything
                res = dict(step=st.name, status="failed", seconds=0.0, rc=None, figures={},
                           reason=f"run_gpu error: {type(e).__name__}: {e}"[:200])
            self.results.append(res)
            self.write_summary()
        self.log.close()
        _cap_file(self.log_path, MAX_FILE_BYTES)
        self.write_summary(final=True)
        if self.stop is not None:
            self.say(f"run_gpu: interrupted by {_signame(self.stop)}; the running step's processes were killed")
        self.print_table()
        if self.stop is not None:
            return 128 + int(self.stop)
        return 0 if all(r["status"] in ("ok", "skipped") for r in self.results) else 1

    def print_table(self) -> None:
        counts = {}
        for r in self.results:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines = ["", "=" * 20 + " run_gpu summary " + "=" * 20,
                 f"{'step':<30}{'status':<9}{'s':>7}  figures"]
        for r in self.results:
            extra = _fmt_figs(r.get("figures") or {}, 150)
            if not extra:
                extra = r.get("reason") or (f"rc={r['rc']}" if r["status"] == "failed" else "")
            lines.append(f"{r['step'][:29]:<30}{r['status']:<9}{r['seconds']:>7.1f}  {extra or ''}")
        total = time.monotonic() - self.t0
        lines.append(f"total {total:.1f} s of budget {self.budget:.0f} s; "
                     + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                     + f"; files: {', '.join(sorted(os.listdir(self.out)))}")
        self.say("\n".join(lines))


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


def _trap_signals(box: List[int]) -> Dict:
    """Handlers that record SIGTERM / SIGINT / SIGHUP in ``box`` (the first one counts) instead of ending the
    process, so that the runner can kill its steps' groups and write its summary; returns the previous ones."""
    def on_signal(signum, frame):
        if not box:
            box.append(signum)

    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except (ValueError, OSError):  # not the main thread, or a platform without it
            pass
    return previous


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _fmt_figs(figs: Dict, width: int) -> str:
    s = " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, str) else v}" for k, v in figs.items())
    return s if len(s) <= width else s[: width - 3] + "..."


def _cap_file(path: str, cap: int) -> None:
    """Keep head and tail of a file larger than ``cap`` bytes."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if size <= cap:
        return
    half = cap // 2 - 256
    with open(path, "rb") as f:
        head = f.read(half)
        f.seek(size - half)
        tail = f.read()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(f"\n[... {size - 2 * half} bytes omitted by run_gpu ...]\n".encode())
        f.write(tail)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"), help="result folder (at most 8 files)")
    ap.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds for everything")
    ap.add_argument("--dry-run", action="store_true", help="stand-in steps (CPU), to test the orchestration")
    ap.add_argument("--only", default="", help="comma list of step-name prefixes to run (others: skipped)")
    ap.add_argument("--skip", default="", help="comma list of step-name prefixes not to run")
    ap.add_argument("--list", action="store_true", help="print the steps and their limits, run nothing")
    ap.add_argument("--limits", default="", help="per-step limits, e.g. 'tests:fused_drafter=200,smoke=60' "
                                                 "(prefix match, seconds)")
    ap.add_argument("--archs", default=os.environ.get("FREE_KERNELS_CUDA_ARCHS", "90"), help="CUDA archs to build")
    ap.add_argument("--grace", type=float, default=None, help="seconds between SIGTERM and SIGKILL (3; dry run 0.5)")
    ap.add_argument("--min-step", type=float, default=None, help="do not start a step with less time (5; dry 0.5)")
    ap.add_argument("--log-head", type=int, default=320 * 1024, help="bytes of a step's output kept from its start")
    ap.add_argument("--log-tail", type=int, default=192 * 1024, help="bytes of a step's output kept from its end")
    ap.add_argument("--parse-keep", type=int, default=4 * 1024 * 1024, help="bytes of output kept for the parsers")
    ap.add_argument("--hang-limit", type=float, default=2.0, help=argparse.SUPPRESS)
    ap.add_argument("--flood-bytes", type=float, default=3e6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.grace is None:
        args.grace = 0.5 if args.dry_run else 3.0
    if args.min_step is None:
        args.min_step = 0.5 if args.dry_run else 5.0
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    signals: List[int] = []
    previous = _trap_signals(signals)
    try:
        return _main(args, signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(args, signals: List[int]) -> int:
    scratch = tempfile.mkdtemp(prefix="run_gpu_")
    try:
        return _run_steps(args, signals, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_steps(args, signals: List[int], scratch: str) -> int:
    steps = (dry_steps if args.dry_run else gpu_steps)(args, scratch)
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    for st in steps:
        if only and not any(st.name.startswith(p) for p in only):
            st.skip = st.skip or "not selected (--only)"
        if any(st.name.startswith(p) for p in skip):
            st.skip = "deselected (--skip)"
    for item in [x for x in args.limits.split(",") if x.strip()]:
        prefix, _, secs = item.partition("=")
        for st in steps:
            if st.name.startswith(prefix.strip()):
                st.limit = float(secs)
    if args.list:
        for st in steps:
            print(f"{st.name:<34}{st.limit:>6.0f} s  {st.skip or ''}")
        return 0
    for name in ("summary.json", "steps.log", "bench.json"):  # a fresh run, not an append to an old one
        p = os.path.join(args.out, name)
        if os.path.exists(p):
            os.remove(p)
    return Runner(args, signals).run(steps)


if __name__ == "__main__":
    sys.exit(main())
