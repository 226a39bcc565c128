"""The ``ringserve`` command line: ``ringserve generate`` runs the engine once, in-process;
``ringserve serve`` starts the Ray Serve application locally (see app/serve_cli.py);
``ringserve dashboards build|push|render`` handles the Grafana dashboards (dashboards/cli.py);
``ringserve bench serve`` measures any OpenAI-compatible server over HTTP (bench/serve_bench.py).

Errors a user can cause (a bad path, a broken checkpoint, a prompt over the limit) print one
line on stderr and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from app.serve_cli import add_serve_parser, serve
from dashboards.cli import add_dashboards_parser
from dashboards.cli import run as dashboards
from model.engine_args import SERVING_QUANTIZATION

EXIT_USER_ERROR = 2


def _add_bench(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from bench.serve_bench import __doc__ as serve_doc
    from bench.serve_bench import add_arguments

    bench = sub.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("serve", help="load-test OpenAI-compatible servers over HTTP",
                         description=serve_doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)


def bench(args: argparse.Namespace) -> int:
    """``ringserve bench serve``: see bench/serve_bench.py."""
    from bench.serve_bench import EXIT_ERROR, BenchError, run

    try:
        return run(args)
    except BenchError as exc:
        print(f"ringserve bench serve: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _add_generate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("generate", help="complete one prompt with the engine and print it")
    p.add_argument("--model", default="default",
                   help="checkpoint folder, .gguf file, or 'default' (the embedded SmolLM2-135M)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--n", type=int, default=1, help="completions to sample for the prompt")
    p.add_argument("--window", type=int, default=None,
                   help="override the checkpoint's sliding window (tokens)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache budget in bytes")
    p.add_argument("--kv-block-size", type=int, default=None,
                   help="positions per block of the paged KV cache (default 16)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quantization", choices=("none", "int8", "int8x2", "int4", "auto"),
                   default=SERVING_QUANTIZATION,
                   help="int8: projections and LM head as int8 (CPU); int8x2: as two int8 "
                        "planes each (~15-bit weights, CPU); int4: projections as 4-bit "
                        "groups, bf16 activations, LM head int8 (CPU; a GGUF Q4_1 file's "
                        "own weights, the fastest form); auto: on CPU the fastest form that "
                        "meets the accuracy goals (int4, else int8x2), bf16 unquantized on "
                        "CUDA; none: the dtype as given")
    p.add_argument("--no-dense-prefill", dest="dense_prefill", action="store_false",
                   help="int4: keep no bf16 copy of the projections for prompt tokens "
                        "(smallest memory, slower prefill)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with text and token_ids (generated ids only)")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")


def generate(args: argparse.Namespace) -> int:
    """``ringserve generate``: load, run one request to completion, print the result."""
    from model.engine import Engine
    from model.engine_args import EngineArgs
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=tuple(args.stop), n=args.n)
    started = time.monotonic()
    engine = Engine.from_args(EngineArgs(
        model=args.model, dtype=args.dtype, device=args.device, window=args.window,
        max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
        block_size=args.kv_block_size,
        max_num_seqs=max(args.n, 1), progress=not args.quiet,
        quantization=args.quantization, dense_prefill=args.dense_prefill))
    if not args.quiet:
        print(f"loaded {engine.model_name} in {time.monotonic() - started:.1f}s",
              file=sys.stderr)
    tokenizer = engine.tokenizer
    if args.chat:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    request = GenerationRequest("cli", tuple(prompt_ids), params, continues_prompt=not args.chat)
    choices = engine.run_to_completion([request])
    if args.json:
        first = choices[0]
        out: dict[str, object] = {"text": first.text, "token_ids": list(first.token_ids),
                                  "finish_reason": first.finish_reason,
                                  "prompt_tokens": first.prompt_tokens}
        if len(choices) > 1:
            out["choices"] = [{"index": c.index, "text": c.text, "token_ids": list(c.token_ids),
                               "finish_reason": c.finish_reason} for c in choices]
        print(json.dumps(out, ensure_ascii=False))
    else:
        for choice in choices:
            if len(choices) > 1:
                print(f"--- choice {choice.index} ({choice.finish_reason})")
            print(choice.text)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the input was wrong', reported in one line."""
    from model.config import ConfigError
    from model.default_model import DefaultModelMissing
    from model.engine import EngineRequestError
    from model.quantization import QuantizationError
    from model.sampling_params import SamplingParamsError
    from model.tokenizers import TokenizerError
    from model.weights import WeightsError

    return (ConfigError, QuantizationError, WeightsError, TokenizerError, EngineRequestError,
            SamplingParamsError, DefaultModelMissing, FileNotFoundError, PermissionError,
            IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    """The ``ringserve`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="ringserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    add_serve_parser(sub)
    add_dashboards_parser(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ringserve`` console script."""
    args = build_parser().parse_args(argv)
    commands = {"generate": generate, "serve": serve, "dashboards": dashboards, "bench": bench}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("ringserve: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"ringserve: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
