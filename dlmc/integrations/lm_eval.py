"""An lm-evaluation-harness model backed by dlmc: `--model dlmc`, generation tasks only.

    dlmc-lm-eval --model dlmc --model_args artifact=out/,gen_length=64 --tasks gsm8k --device cpu
    dlmc-lm-eval --model dlmc --model_args checkpoint=path/to/llada,decoder=freedave,drafts=4 --tasks ...
    dlmc-lm-eval --model dlmc --model_args strategy=eb,strategy.gamma=0.1 --tasks ...   # embedded model

lm-eval 0.4.13 finds models only in its own registry and has no plugin entry point for them, so
`dlmc-lm-eval` is lm-eval's own command line with this module imported first (which registers
"dlmc"); from Python, `import dlmc.integrations.lm_eval` and call `lm_eval.simple_evaluate(model="dlmc",
...)`, or pass a `DlmcLM` instance.

model_args: `artifact=DIR` or `checkpoint=DIR` (neither: the embedded model), `decoder=NAME`, any field
of that decoder's config (`gen_length=`, `block_length=`, `threshold=`, ...), `strategy=NAME` with its
parameters as `strategy.PARAM=VALUE`, `seed=`, `dtype=` (checkpoints). `--batch_size N` decodes N
requests together; `--device` picks cpu or cuda (lm-eval's command line asks for cuda:0 unless told
otherwise; on a machine without CUDA that is an error, not a silent move to the CPU).

Each request's `max_gen_toks` is the canvas length (unless `gen_length` is given, which is then the
canvas and `max_gen_toks` only cuts the result); the text is cut at the model's end-of-sequence and at
the first of the request's `until` strings. A diffusion LM has no cheap exact likelihood, so
`loglikelihood` tasks are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dlmc.errors import DlmcError

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature")
"""The generation settings a request may carry; any other is refused rather than ignored."""


@register_model("dlmc")
class DlmcLM(LM):
    def __init__(
        self,
        artifact: str | None = None,
        checkpoint: str | None = None,
        decoder: str | None = None,
        strategy: str | None = None,
        seed: int = 0,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **options,
    ):
        super().__init__()
        from dlmc.loading import load_decodable

        if artifact is not None and checkpoint is not None:
            raise DlmcError("model_args: artifact and checkpoint are exclusive; set one of them")
        if not (isinstance(batch_size, int) or str(batch_size).isdigit()) or int(batch_size) < 1:
            raise DlmcError(f"batch_size={batch_size}: dlmc takes a positive integer (no 'auto')")
        self.loaded = load_decodable(artifact or checkpoint, device, dtype)
        if self.loaded.tokenizer is None:
            raise DlmcError(f"{artifact or checkpoint}: lm-eval needs the model's tokenizer files, and it has none")
        self.decoder, self.seed, self.batch = decoder, int(seed), int(batch_size)
        self.options = with_strategy(options, strategy)
        self.config_for(64)  # a bad option fails now, not at the first request

    def config_for(self, max_gen_toks: int, temperature: float | None = None):
        """(decoder name, config) for a request: the canvas is max_gen_toks unless gen_length was given."""
        from dlmc.generation import decoder_config

        options = {"gen_length": max_gen_toks} | self.options
        try:
            name, config = decoder_config(self.loaded.spec, self.decoder, options, self.loaded.defaults)
            if temperature is None or getattr(config, "temperature", 0.0) == temperature:
                return name, config
            if not hasattr(config, "temperature"):  # a greedy-only decoder (freedave) honours temperature 0
                raise DlmcError(f"gen_kwargs: temperature={temperature}: the {name} decoder does not sample")
            return decoder_config(self.loaded.spec, name, options | {"temperature": temperature}, self.loaded.defaults)
        except DlmcError as e:
            raise DlmcError(f"model_args: {e}") from None

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise DlmcError("loglikelihood: a diffusion LM has no cheap exact likelihood; dlmc runs generate_until "
                        "tasks only")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise DlmcError("loglikelihood_rolling: a diffusion LM has no cheap exact likelihood; dlmc runs "
                        "generate_until tasks only")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same settings decode together, `batch_size` at a time; answers keep the
        requests' order."""
        groups: dict[tuple, list[int]] = {}
        settings = [self._settings(request.args[1]) for request in requests]
        for i, (until, max_gen_toks, temperature) in enumerate(settings):
            groups.setdefault((max_gen_toks, temperature), []).append(i)
        answers: list[str | None] = [None] * len(requests)
        for (max_gen_toks, temperature), indices in groups.items():
            name, config = self.config_for(max_gen_toks, temperature)
            for start in range(0, len(indices), self.batch):
                chunk = indices[start : start + self.batch]
                texts = self._generate([requests[i].args[0] for i in chunk], name, config, max_gen_toks)
                for i, text in zip(chunk, texts, strict=True):
                    answers[i] = cut_at(text, settings[i][0])
                    self.cache_hook.add_partial("generate_until", requests[i].args, answers[i])
        return answers

    def _settings(self, gen_kwargs: dict) -> tuple[list[str], int, float | None]:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise DlmcError(f"gen_kwargs: {unknown[0]} is not supported by dlmc (it honours {', '.join(GEN_KWARGS)})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = int(gen_kwargs.get("max_gen_toks", 256))
        temperature = gen_kwargs.get("temperature")
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        return until, max_gen_toks, None if temperature is None else float(temperature)

    def _generate(self, contexts: list[str], name: str, config, max_gen_toks: int) -> list[str]:
        from dlmc.decoding.common import stop_token_ids
        from dlmc.generation import generate

        model, spec, tokenizer = self.loaded.model, self.loaded.spec, self.loaded.tokenizer
        prompts = [tokenizer.encode(context) for context in contexts]
        completions = generate(model, spec, tokenizer, prompts, name, config, seed=self.seed)
        stops = set(stop_token_ids(spec, None))
        texts = []
        for completion in completions:
            ids = completion.output_ids[:max_gen_toks]
            end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
            texts.append(tokenizer.decode(ids[:end]))
        return texts

    @property
    def tokenizer_name(self) -> str:
        return "dlmc"


def with_strategy(options: dict, strategy: str | None) -> dict:
    """Decoder options with `strategy=NAME` and its `strategy.PARAM=VALUE` model_args folded into the
    config's `strategy` field ({"name": NAME, PARAM: VALUE}, or NAME alone): the one place the adapter
    meets the decoding-strategy layer, which validates the mapping."""
    options = dict(options)
    params = {key.split(".", 1)[1]: options.pop(key) for key in list(options) if key.startswith("strategy.")}
    if params and strategy is None:
        raise DlmcError(f"model_args: strategy.{next(iter(params))} given without strategy=NAME")
    if strategy is not None:
        options["strategy"] = {"name": strategy, **params} if params else strategy
    return options


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings (those that are not empty)."""
    ends = [text.find(stop) for stop in until if stop]
    ends = [end for end in ends if end >= 0]
    return text[: min(ends)] if ends else text


def main(argv: list[str] | None = None) -> None:
    """`dlmc-lm-eval`: lm-eval's command line with the dlmc model registered; dlmc errors as one line."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except DlmcError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
