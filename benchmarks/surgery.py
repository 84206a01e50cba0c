"""Surgery on the real SmolLM2-135M, on this CPU: what each step costs, and what it buys.

Prints the time to compute importance and permute, to enter and leave `apply_masks`, to
`extract`, and the evaluation speed of an extracted sub-network with about half the
parameters against the same sub-network as masks on the resident model, on the same tokens.

    python benchmarks/surgery.py [--seq-len 256] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunetune.evaluators.data import load_text
from prunetune.evaluators.model import load_model
from prunetune.evaluators.perplexity import perplexity, tokenize_windows
from prunetune.evaluators.surgery import apply_masks, extract
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import count_params
from prunetune.evaluators.importance import activation_scores, permute_model


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def half_size_subnet(config) -> SubnetConfig:
    """A uniform sub-network of all layers with about half of the dense parameters."""
    n = config.num_hidden_layers
    return SubnetConfig(layers=range(n), kv_heads=(2,) * n, q_per_kv=(3,) * n,
                        mlp=(768,) * n, embed=448)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    load_s, (model, tokenizer) = timed(lambda: load_model("smollm2"), 1)
    windows = tokenize_windows(tokenizer, load_text("wikitext2"), args.seq_len, args.batch * 2)
    calibration = tokenize_windows(tokenizer, load_text("wikitext2:valid"), args.seq_len, 8)
    dense_params = sum(p.numel() for p in model.parameters())
    print(f"load SmolLM2-135M (cached GGUF):   {load_s:8.3f} s")

    score_s, scores = timed(lambda: activation_scores(model, calibration), 1)
    permute_s, _ = timed(lambda: permute_model(model, scores), 1)
    print(f"importance, 8 x {args.seq_len} tokens:      {score_s:8.3f} s")
    print(f"permute weights in place:         {permute_s:8.3f} s")

    subnet = half_size_subnet(model.config)
    params = count_params(model.config, subnet)

    def enter_and_leave() -> None:
        with apply_masks(model, subnet):
            pass

    masks_s, _ = timed(enter_and_leave, 20)
    extract_s, small = timed(lambda: extract(model, subnet), args.repeats)
    print(f"enter + leave apply_masks:        {masks_s * 1e3:8.3f} ms")
    print(f"extract ({params / dense_params:.0%} of params):        {extract_s:8.3f} s")

    def masked_eval() -> dict:
        with apply_masks(model, subnet):
            return perplexity(model, windows, batch_size=args.batch)

    masked_s, masked = timed(masked_eval, args.repeats)
    extracted_s, extracted = timed(lambda: perplexity(small, windows, batch_size=args.batch), args.repeats)
    dense_s, dense = timed(lambda: perplexity(model, windows, batch_size=args.batch), args.repeats)
    tokens = windows.numel()
    print(f"\nevaluation of {len(windows)} windows x {args.seq_len} tokens (median of {args.repeats}):")
    print(f"  dense      {dense_s:7.3f} s  {tokens / dense_s:8.0f} tok/s  ppl {dense['perplexity']:.3f}")
    print(f"  masked     {masked_s:7.3f} s  {tokens / masked_s:8.0f} tok/s  ppl {masked['perplexity']:.3f}")
    print(f"  extracted  {extracted_s:7.3f} s  {tokens / extracted_s:8.0f} tok/s  ppl {extracted['perplexity']:.3f}")
    print(f"  extracted is {masked_s / extracted_s:.2f}x faster than masked "
          f"({params:,} of {dense_params:,} params)")


if __name__ == "__main__":
    main()
