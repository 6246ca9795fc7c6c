"""`provider` command line: profile the hardware, list models, run the local demo."""

from __future__ import annotations

import argparse
import json
import sys
import time

from node.config import ModelError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="provider", description="Serve model shards in a meshpool.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="measure this machine's devices and print the profile as JSON")
    p.add_argument("--device", action="append", help="device to measure (cpu, cuda:0, mps); default: all")
    p.add_argument("--quick", action="store_true", help="smaller, faster measurements")
    p.set_defaults(func=_profile)

    p = sub.add_parser("join", help="join a pool: profile, register, serve the shard assigned")
    p.add_argument("coordinator", help="the coordinator's multiaddr, with /p2p/<peer id>")
    p.add_argument("--data-dir", required=True, help="where this provider keeps its identity key")
    p.add_argument("--device", default="auto", help="auto, cpu, mps or cuda:N")
    p.add_argument("--max-memory-mb", type=int, help="memory the pool may fill (default: the device's free memory)")
    p.add_argument("--model", help="Hugging Face-format model directory (default: the shipped model)")
    p.add_argument("--quick-profile", action="store_true", help="smaller, faster hardware measurements")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the precision to ask the coordinator for (default: float32 on a CPU, bfloat16 on a GPU)")
    p.add_argument("--retention-mb", type=int, default=512,
                   help="memory for the tensors kept for audits (every layer's updates of recent requests)")
    p.add_argument("--fault-injection", metavar="KIND",
                   help="misbehave on purpose, to test the auditors: noise[:rel], skip, wrong-model, lazy, "
                        "bad-verifier, refuse, crash, inflate-profile, int8, fp8, int4, tamper, skip-layer, window, token, "
                        "other-model")
    p.add_argument("--listen-host", default="127.0.0.1",
                   help="address libp2p listens on (this machine's LAN address when the pool spans machines)")
    p.add_argument("--p2p-port", type=int, default=0, help="libp2p listen port (0: any free port)")
    p.add_argument("--announce-addr", default="",
                   help="announce this /ip4/<ip>/tcp/<port> instead of the listen address (a port forwarded "
                        "on the home router)")
    p.add_argument("--relay", choices=("auto", "always", "never"), default="auto",
                   help="be reached through the coordinator's relay: auto (when its AutoNAT dial-back "
                        "cannot reach us), always, never")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_join)

    p = sub.add_parser("status", help="print what a provider is doing (DATA_DIR/status.json) as JSON")
    p.add_argument("--data-dir", required=True, help="the provider's data directory")
    p.set_defaults(func=_status)

    p = sub.add_parser("models", help="print '<model-id> <path>' per available model, default first")
    p.set_defaults(func=_models)

    p = sub.add_parser("demo", help="generate through chained shards of a model in this process")
    p.add_argument("--model", help="Hugging Face-format model directory (default: the shipped model)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--stages", type=int, default=3, help="number of stages of unequal length")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="also decode this many prompts together")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ModelError as exc:
        print(f"provider: {exc}", file=sys.stderr)
        return 2


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)


def _profile(args) -> int:
    import torch

    from node.profile import available_devices, measure

    devices = [torch.device(d) for d in args.device] if args.device else available_devices()
    with _progress_bar(2 * len(devices), "profiling") as bar:
        profile = measure(devices, quick=args.quick, progress=lambda _step: bar.update())
    print(json.dumps(profile.to_dict(), indent=2))
    return 0


def _join(args) -> int:
    import logging
    import signal
    import threading
    from pathlib import Path

    import torch

    from node.cpu_threads import serve_switch_interval
    from node.faults import Fault
    from node.models import default_model_dir
    from node.profile import available_devices, measure
    from node.provider import Provider
    from node.retention import RetentionStore
    from node.status import StatusLine, StatusWriter
    from node.transport import TransportError
    from node.transport.identity import load_or_create
    from node.transport.instance import AlreadyServing, InstanceLock

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve_switch_interval()
    try:
        fault = Fault.parse(args.fault_injection)
    except ValueError as exc:
        print(f"provider: {exc}", file=sys.stderr)
        return 2
    if fault is not None:
        print(f"provider: fault injection {fault.kind!r} is ON: this provider cheats on purpose", file=sys.stderr)
    try:  # before the key is read: a second process with this key must not dial anyone
        lock = InstanceLock(args.data_dir).acquire()  # noqa: F841 - held until the process ends
    except AlreadyServing as exc:
        print(f"provider: {exc}", file=sys.stderr)
        return 1
    device = available_devices()[0] if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda":  # any index this host has; its kernels run there (node/device_scope.py)
        device = torch.device("cuda", device.index or 0)
        if device.index >= torch.cuda.device_count():
            print(f"provider: no device {device}: this host has {torch.cuda.device_count()} CUDA devices",
                  file=sys.stderr)
            return 2
    identity = load_or_create(args.data_dir)
    model_dir = Path(args.model) if args.model else default_model_dir(progress=True)
    with _progress_bar(2, "profiling") as bar:
        profile = measure([device], quick=args.quick_profile, progress=lambda _step: bar.update())
    max_memory_bytes = (args.max_memory_mb * 2**20 if args.max_memory_mb
                        else profile.devices[0].memory_free_bytes)
    provider = Provider(identity, args.coordinator, model_dir, device, profile.to_dict(), max_memory_bytes,
                        dtype=getattr(torch, args.dtype) if args.dtype else None, fault=fault,
                        retained=RetentionStore(budget_bytes=args.retention_mb * 2**20),
                        listen_host=args.listen_host, relay=args.relay, p2p_port=args.p2p_port,
                        announce=args.announce_addr)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        peer = provider.start()
    except (ConnectionError, TransportError) as exc:  # unreachable, or it refused us and says why
        print(f"provider: {exc}", file=sys.stderr)
        provider.node.close()
        return 1
    print(f"provider ready peer={peer}", flush=True)
    print(f"provider reachable at {provider.announced_addr}", file=sys.stderr, flush=True)
    line = StatusLine()  # one live line on a terminal; DATA_DIR/status.json for `provider status`
    for handler in logging.getLogger().handlers:
        handler.addFilter(line.log_filter)
    writer = StatusWriter(args.data_dir, provider.stats, line).start()
    stop.wait()
    writer.stop(final_state="leaving")
    print("leaving: handing work back to the pool", file=sys.stderr, flush=True)
    provider.leave()
    writer.stop()
    return 0


def _status(args) -> int:
    from node.status import read_status

    try:
        status = read_status(args.data_dir)
    except FileNotFoundError:
        print(f"provider: no status in {args.data_dir} (has a provider run there?)", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"provider: bad status file: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2, sort_keys=True))
    return 0


def _models(args) -> int:
    from node.models import available_models

    for model_id, path in available_models():
        print(f"{model_id} {path}")
    return 0


def _demo(args) -> int:
    from transformers import AutoTokenizer

    from node.config import ModelConfig
    from node.local_pipeline import LocalPipeline
    from node.models import default_model_dir
    from node.shard import split_layers

    model_dir = args.model or default_model_dir(progress=True)
    config = ModelConfig.load(model_dir)
    # Unequal stages, as a heterogeneous pool would place them: the first device largest.
    ranges = split_layers(config.n_layers, [float(args.stages - i) for i in range(args.stages)])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with _progress_bar(len(ranges), "loading shards") as bar:
        pipeline = LocalPipeline.load(model_dir, ranges, on_stage_loaded=bar.update)
    print(f"model {model_dir} ({config.n_layers} layers), stages {ranges}")

    stop = config.eos_token_ids
    print(f"> {args.prompt}")
    token_times_s = []
    start = time.perf_counter()
    [tokens] = pipeline.generate(
        [_chat_ids(tokenizer, args.prompt)], args.max_new_tokens, stop_ids=stop,
        on_token=lambda _i, _t: token_times_s.append(time.perf_counter()),
    )
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    decode_s = token_times_s[-1] - token_times_s[0]
    rate = f", then {(len(tokens) - 1) / decode_s:.1f} tokens/s" if len(tokens) > 1 else ""
    print(f"batch 1: {len(tokens)} tokens, first after {token_times_s[0] - start:.2f} s{rate}")

    if args.batch > 1:
        prompts = [_chat_ids(tokenizer, f"Count from {i} to {i + 20}.") for i in range(args.batch)]
        start = time.perf_counter()
        outputs = pipeline.generate(prompts, args.max_new_tokens, stop_ids=stop)
        seconds = time.perf_counter() - start
        n = sum(len(o) for o in outputs)
        print(f"batch {args.batch}: {n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s")
    return 0


def _chat_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    return tokenizer(text)["input_ids"]


if __name__ == "__main__":
    sys.exit(main())
