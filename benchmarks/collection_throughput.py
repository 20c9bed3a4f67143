"""Activation-collection throughput (tokens/s) and peak memory on the default model.

Collects the last-token residual stream after every block for N sentences (default 5,000 SST-2
training sentences from the shared data) with `interp.concepts.collect`, and, on the first
`--reference-n` of them in the same run, with the straightforward loop that runs one text at a
time through `run_with_cache` (what the Concept Depth authors' code does). Reports tokens/s of
both, their ratio, the largest difference between their activations, and the peak resident
memory during our collection (sampled from /proc every 20 ms) above the memory held before it.
Writes results/benchmarks/collection_throughput.json.

    python benchmarks/collection_throughput.py [--n 5000] [--batch-size 32] [--reference-n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path


def _rss_mb() -> float:
    """Current resident memory of this process in MiB (Linux /proc; else the lifetime peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Samples resident memory in a thread while the `with` block runs."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s, self.peak_mb, self.start_mb = every_s, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = _rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def reference(model, texts: list[str], names: list[str]):
    """One text at a time through run_with_cache; the last token of each hook point."""
    import torch

    rows = []
    for text in texts:
        tokens = model.to_tokens(text, prepend_bos=model.cfg.default_prepend_bos)
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=names)
        rows.append(torch.cat([cache[n][0, -1].float() for n in names]))
    return torch.stack(rows)


def main() -> None:
    import torch

    from interp import models
    from interp.concepts.collect import collect
    from interp.concepts.datasets import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=5000, help="sentences to collect (default 5000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reference-n", type=int, default=200,
                        help="sentences for the one-at-a-time reference (default 200)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/collection_throughput.json"))
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = models.load(args.model, device="cpu")
    texts = load_dataset("sst2").texts[: args.n]
    names = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    # Warm-up: the first forward pass pages in the weights and allocator pools; not measured.
    collect(model, texts[:8], names, layers=None, progress=False)
    with PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        acts = collect(model, texts, names, layers=None, pool="last", batch_size=args.batch_size,
                       progress=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = int(acts.n_tokens.sum())
    ours = {"texts": len(texts), "tokens": tokens, "seconds": wall, "cpu_seconds": cpu, "tokens_per_s": tokens / wall,
            "texts_per_s": len(texts) / wall, "peak_rss_mb": mem.peak_mb,
            "rss_before_mb": mem.start_mb, "peak_above_before_mb": mem.peak_mb - mem.start_mb,
            "result_mb": len(texts) * sum(acts[n].shape[1] for n in names) * 4 / 2**20,
            "batch_size": args.batch_size}

    subset = texts[: args.reference_n]
    t0 = time.perf_counter()
    ref = reference(model, subset, names)
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sub = collect(model, subset, names, layers=None, batch_size=args.batch_size, progress=False)
    sub_s = time.perf_counter() - t0
    sub_tokens = int(sub.n_tokens.sum())
    ours_flat = torch.cat([sub[n] for n in names], dim=1)
    max_diff = (ours_flat - ref).abs().max().item()
    rel_diff = ((ours_flat - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    comparison = {"texts": len(subset), "tokens": sub_tokens,
                  "reference_tokens_per_s": sub_tokens / ref_s, "ours_tokens_per_s": sub_tokens / sub_s,
                  "speedup": ref_s / sub_s, "max_abs_diff": max_diff, "max_rel_diff": rel_diff}
    result = {"model": args.model, "threads": torch.get_num_threads(),
              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "collect": ours,
              "vs_one_at_a_time": comparison}

    print(f"\n{args.model}: {len(texts)} sentences, {tokens} tokens, last-token resid_post of "
          f"{len(names)} layers, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"  collect:          {ours['tokens_per_s']:8.0f} tokens/s  ({wall:.1f} s, "
          f"{ours['texts_per_s']:.1f} texts/s; {cpu:.1f} s CPU)")
    print(f"  peak memory:      {mem.peak_mb:8.0f} MiB resident ({ours['peak_above_before_mb']:.0f} MiB "
          f"above the {mem.start_mb:.0f} MiB held before; result {ours['result_mb']:.0f} MiB)")
    print(f"  on {len(subset)} sentences: one at a time {comparison['reference_tokens_per_s']:.0f} "
          f"tokens/s, ours {comparison['ours_tokens_per_s']:.0f} tokens/s -> "
          f"{comparison['speedup']:.1f}x; max |diff| {max_diff:.2e} (relative {rel_diff:.1e})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
