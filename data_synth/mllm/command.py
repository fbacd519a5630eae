"""`unime generate IMAGE_DIR OUT_DIR --backend vllm|openai ...`: the MLLM generator's command line."""

from __future__ import annotations

import argparse

from unime.data_synth.mllm.plan import COMBINATIONS, DEFAULT_LANGUAGES, TASKS


def _list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image_dir", help="folder of photos (searched recursively)")
    parser.add_argument("out_dir", help="output folder: shard-*.jsonl, manifest.json, views/ (resumed if present)")
    parser.add_argument("--backend", choices=["vllm", "openai"], required=True)
    parser.add_argument("--model", required=True, help="vllm: a local model directory; openai: the model name")
    parser.add_argument("--base-url", help="openai: the API root, e.g. http://localhost:8000/v1")
    parser.add_argument("--shard", help="'i/N': generate only this shard's photos (0-based i)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="mme5_v1", help="packaged prompt name or a prompt .txt file")
    parser.add_argument("--tasks", type=_list, default=TASKS, help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument(
        "--combinations", type=_list, default=COMBINATIONS, help=f"comma-separated subset of {','.join(COMBINATIONS)}"
    )
    parser.add_argument("--languages", type=_list, default=DEFAULT_LANGUAGES, help="comma-separated languages")
    parser.add_argument("--min-score", type=int, default=4, help="lowest self-evaluation score kept (1-5)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-image-side", type=int, default=1024)
    parser.add_argument("--near-duplicate-bits", type=int, default=4, help="dHash distance of duplicate photos")
    parser.add_argument("--records-per-shard", type=int, default=1000)
    parser.add_argument("--limit", type=int, help="at most this many photos of the shard")
    parser.add_argument("--no-structured-output", action="store_true", help="do not constrain to the JSON schema")
    openai = parser.add_argument_group("openai backend")
    openai.add_argument("--concurrency", type=int, default=8)
    openai.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    openai.add_argument("--retries", type=int, default=4)
    openai.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    openai.add_argument("--api-key-env", default="OPENAI_API_KEY")
    vllm = parser.add_argument_group("vllm backend")
    vllm.add_argument("--data-parallel-size", type=int, default=1, help="independent engines splitting the job")
    vllm.add_argument("--tensor-parallel-size", type=int, default=1)
    vllm.add_argument("--batch-size", type=int, default=64)
    vllm.add_argument("--stage-size", type=int, default=1024, help="requests per staged chunk file")
    vllm.add_argument("--max-model-len", type=int, default=8192)
    vllm.add_argument("--enforce-eager", action="store_true")
    vllm.add_argument("--single-process", action="store_true", help="engine inside its worker (faster CPU start)")
    vllm.add_argument("--chat-template", help="a Jinja chat template file instead of the model's")


def run(args: argparse.Namespace) -> int:
    from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset, print_summary
    from unime.data_synth.mllm.plan import PlanChoices
    from unime.errors import ConfigError

    config = GenerateConfig(
        image_dir=args.image_dir,
        out_dir=args.out_dir,
        prompt=args.prompt,
        choices=PlanChoices(args.tasks, args.combinations, args.languages),
        seed=args.seed,
        shard=args.shard,
        min_score=args.min_score,
        max_image_side=args.max_image_side,
        near_duplicate_bits=args.near_duplicate_bits,
        records_per_shard=args.records_per_shard,
        limit=args.limit,
    )
    if args.backend == "openai":
        from unime.data_synth.mllm.openai_backend import OpenAIBackend, OpenAIBackendConfig

        if not args.base_url:
            raise ConfigError("--backend openai needs --base-url")
        backend = OpenAIBackend(
            OpenAIBackendConfig(
                base_url=args.base_url,
                model=args.model,
                api_key_env=args.api_key_env,
                concurrency=args.concurrency,
                timeout_s=args.timeout,
                max_retries=args.retries,
                backoff_s=args.backoff,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                structured_output=not args.no_structured_output,
            )
        )
    else:
        from unime.data_synth.mllm.vllm_backend import VllmBackend, VllmBackendConfig

        backend = VllmBackend(
            VllmBackendConfig(
                model=args.model,
                data_parallel_size=args.data_parallel_size,
                tensor_parallel_size=args.tensor_parallel_size,
                batch_size=args.batch_size,
                stage_size=args.stage_size,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed,
                max_model_len=args.max_model_len,
                structured_output=not args.no_structured_output,
                enforce_eager=args.enforce_eager,
                single_process=args.single_process,
                chat_template=args.chat_template,
            ),
            work_dir=args.out_dir,
        )
    manifest = generate_dataset(config, backend, backend_kind=args.backend)
    print_summary(manifest, args.out_dir)
    return 0
