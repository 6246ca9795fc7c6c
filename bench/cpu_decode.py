"""Batch-1 decode tokens/s of the shard runtime beside the fastest single-process decode on this CPU.

    python bench/cpu_decode.py                        # default model, float32, 48 new tokens, 5 rounds
    python bench/cpu_decode.py --baseline-ref main    # the runtime at another commit as the baseline

In one run, each contender a process of its own that loads the model once and then decodes the
same prompt greedily when asked; the rounds go contender by contender, so every figure meets the
same load (this machine's two cores are shared) and each figure is the median over the rounds:
- the shard runtime of this tree, all layers in one shard, at the intra-op threads a provider
  uses (torch's default; node/cpu_threads.py takes small decode steps to one thread), and on one
  thread (as the pool's processes in coordinator/local_pool.py run);
- the same runtime at `--baseline-ref` (a `git archive` of that commit, default the commit before
  the CPU decode work), on torch's default threads and on one thread;
- `transformers` `generate` in the project's environment and `transformers` 4.33 in a separate
  virtual environment (made at `--ref-venv` if absent: `python -m venv`, then `pip install
  torch==<this torch> transformers==4.33.*`), each on 1 and on 2 threads, and on 1 thread with
  torch's THP_MEM_ALLOC_ENABLE=1 (huge pages, which the runtime asks for itself). The fastest of
  these is "the fastest single-process decode"; the figure against stock transformers (no THP)
  is printed too.
Each times decode steps only: the runtime's steps after its prefill; `generate(N)` minus
`generate(1)` for transformers. The greedy texts must be identical (the run fails otherwise).
Writes bench/cpu_decode.json next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REF = "7d4d494"  # main before the CPU decode work (input-major weights, one-thread small steps)
PROMPT = "Write a short story about a robot who learns to paint."  # tests/node/test_runtime_reference.py's
REF_TRANSFORMERS = "4.33.*"


# -- workers: one process per contender, JSON lines on stdin/stdout ------------------------------

def worker_main(kind: str, model_dir: str, threads: int) -> None:
    """Load, say ready, then for each {"ids": [...], "n": N} line answer {"seconds", "tokens"}."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    run = _transformers_runner(model_dir) if kind == "transformers" else _runtime_runner(model_dir)
    info = {"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if kind == "transformers":
        import transformers
        info["transformers"] = transformers.__version__
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        seconds, tokens = run(ask["ids"], ask["n"])
        print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


def _transformers_runner(model_dir: str):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    major = int(transformers.__version__.split(".")[0])
    kwargs = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    if major < 5:
        # The converted model's config.json is written by transformers 5, which keeps RoPE's base
        # under rope_parameters; 4.x reads rope_theta and would silently take its default (10000).
        config = transformers.AutoConfig.from_pretrained(model_dir)
        rope = getattr(config, "rope_parameters", None) or {}
        if "rope_theta" in rope:
            config.rope_theta = rope["rope_theta"]
        kwargs["config"] = config
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    model.generation_config.eos_token_id = None  # decode the full count, as the runtime does

    def generate(ids, n):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()

    def run(prompt, n):
        ids = torch.tensor([prompt])
        first_s, _ = generate(ids, 1)
        total_s, tokens = generate(ids, n)
        return max(total_s - first_s, 1e-9), tokens  # n - 1 decode steps

    return run


def _runtime_runner(model_dir: str):
    import torch

    from node.config import ModelConfig
    from node.models import model_id_of
    from node.runtime import ShardRuntime
    from node.shard import Shard

    n_layers = ModelConfig.load(model_dir).n_layers
    runtime = ShardRuntime(model_dir, Shard(model_id_of(model_dir), 0, n_layers, n_layers), max_sessions=8,
                           max_seq_len=2048)

    def run(prompt, n):
        runtime.close("bench")
        tokens = [int(runtime.prefill("bench", torch.tensor(prompt)).argmax(-1))]
        start = time.perf_counter()
        for _ in range(n - 1):
            tokens.append(int(runtime.decode([("bench", torch.tensor([tokens[-1]]))]).argmax(-1)))
        return time.perf_counter() - start, tokens

    return run


class Worker:
    def __init__(self, name: str, python: str, kind: str, model_dir: Path, threads: int, code_dir: Path,
                 env: dict[str, str] | None = None):
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(code_dir), **(env or {})}
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", kind, "--model", str(model_dir),
             "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
            cwd=tempfile.gettempdir())  # not the tree: the baseline's code must come from its PYTHONPATH
        self.info = self._read()
        self.rates: list[float] = []
        self.tokens: list[int] | None = None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the worker exited (rc {self.proc.wait()})")
        return json.loads(line)

    def run(self, ids: list[int], n: int) -> float:
        self.proc.stdin.write(json.dumps({"ids": ids, "n": n}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        self.tokens = answer["tokens"]
        rate = (n - 1) / answer["seconds"]
        self.rates.append(rate)
        return rate

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- the run ------------------------------------------------------------------------------------

def ensure_ref_venv(venv: Path, torch_version: str) -> str:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv}: python -m venv, pip install torch=={torch_version} transformers=={REF_TRANSFORMERS}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}",
                        f"transformers=={REF_TRANSFORMERS}"], check=True)
    return str(python)


def baseline_tree(ref: str, into: Path) -> Path:
    """The importable packages of commit `ref`, extracted under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "contracts", "ledger", "wire", "verification",
                              "node"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["transformers", "runtime"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help="model directory (default: the shipped default model)")
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the baseline runtime")
    parser.add_argument("--ref-venv", type=Path, default=Path(tempfile.gettempdir()) / "tf433-venv",
                        help=f"virtual environment with transformers {REF_TRANSFORMERS} (made if absent)")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("cpu_decode.json"))
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker, args.model, args.threads)

    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoTokenizer

    from node.models import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"])
    ref_python = ensure_ref_venv(args.ref_venv, torch.__version__.split("+")[0])
    base_dir = Path(tempfile.mkdtemp(prefix="cpu-decode-baseline-"))
    baseline_tree(args.baseline_ref, base_dir)
    here = sys.executable
    thp = {"THP_MEM_ALLOC_ENABLE": "1"}  # torch's own switch: huge pages for its allocations >= 2 MiB
    specs = [  # name, python, kind, threads (0: torch's default, as a provider runs), code, environment
        ("runtime", here, "runtime", 0, ROOT, None),
        ("runtime 1 thread", here, "runtime", 1, ROOT, None),  # as LocalPool's providers run (OMP_NUM_THREADS=1)
        (f"runtime@{args.baseline_ref}", here, "runtime", 0, base_dir, None),
        (f"runtime@{args.baseline_ref} 1 thread", here, "runtime", 1, base_dir, None),
        ("transformers (project) 1 thread", here, "transformers", 1, ROOT, None),
        ("transformers (project) 2 threads", here, "transformers", 2, ROOT, None),
        ("transformers (project) 1 thread THP", here, "transformers", 1, ROOT, thp),
        ("transformers 4.33 1 thread", ref_python, "transformers", 1, base_dir, None),
        ("transformers 4.33 2 threads", ref_python, "transformers", 2, base_dir, None),
        ("transformers 4.33 1 thread THP", ref_python, "transformers", 1, base_dir, thp),
    ]
    workers = []
    try:
        for name, python, kind, threads, code, env in specs:
            workers.append(Worker(name, python, kind, model_dir, threads, code, env))
        versions = {w.name: w.info for w in workers}
        print(f"model {model_dir.name}, float32, prompt {len(ids)} tokens, {args.new_tokens} new, "
              f"{args.rounds} rounds; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machine)")
        for w in workers:  # warm-up: first calls allocate and pick kernels
            w.run(ids, 4)
            w.rates.clear()
        for r in range(args.rounds):
            cells = [f"{w.run(ids, args.new_tokens):.1f}" for w in workers]
            print(f"round {r + 1}: " + " ".join(cells) + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for w in workers:
            w.close()
    texts = {w.name: tokenizer.decode(w.tokens) for w in workers}
    same = len(set(texts.values())) == 1
    median = {w.name: statistics.median(w.rates) for w in workers}
    refs = [w.name for w in workers if w.name.startswith("transformers")]
    fastest = max(refs, key=median.get)
    print(f"\n{'contender':<34} {'threads':>7} {'tok/s median':>12} {'min':>6} {'max':>6} {'vs fastest':>10}")
    for w in workers:
        print(f"{w.name:<34} {w.info['threads']:>7} {median[w.name]:>12.1f} {min(w.rates):>6.1f} {max(w.rates):>6.1f} "
              f"{median[w.name] / median[fastest]:>9.2f}x")
    ours, base = median["runtime"], median[f"runtime@{args.baseline_ref}"]
    stock = max((n for n in refs if not n.endswith("THP")), key=median.get)
    print(f"runtime / fastest single-process ({fastest}): {ours / median[fastest]:.2f}x (must hold: >= 1.2x); "
          f"runtime / fastest stock transformers ({stock}): {ours / median[stock]:.2f}x; "
          f"runtime / baseline runtime: {ours / base:.2f}x; greedy text identical across all: {same}")
    out = {
        "model": model_dir.name, "dtype": "float32", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "prompt": PROMPT, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
        "rounds": args.rounds, "baseline_ref": args.baseline_ref, "ref_venv": str(args.ref_venv),
        "contended": "2 cores shared with other work; medians over rounds interleaved across contenders",
        "versions": versions,
        "tokens_per_s": {name: {"median": round(median[name], 2), "all": [round(x, 2) for x in w.rates]}
                         for name, w in zip(median, workers)},
        "fastest_single_process": fastest,
        "runtime_vs_fastest": round(ours / median[fastest], 3),
        "fastest_stock_transformers": stock, "runtime_vs_fastest_stock": round(ours / median[stock], 3),
        "runtime_vs_baseline": round(ours / base, 3),
        "same_text": same, "text": texts["runtime"],
    }
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    if not same:
        for name, text in texts.items():
            print(f"  {name}: {text!r}")
        raise SystemExit("the greedy texts differ")


if __name__ == "__main__":
    main()
