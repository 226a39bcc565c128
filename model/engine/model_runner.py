"""ModelRunner: a scheduled step in, one forward pass and the sampled tokens out.

It turns the scheduler's chunks into the token tensor and cache chunks the Transformer takes,
runs the model, and samples the rows whose chunk asks for a token. A batched draw that raises
is redone row by row (seeded generators restored first), so one request's failure never costs
the others their tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from model.engine.types import ModelRunnerOutput, SampledToken, SamplingFailure, SequenceState
from model.paged_cache import PagedChunk, PagedKVCache
from model.sampler import SamplingRow, sample
from model.scheduler import ScheduledChunk
from model.transformer import Transformer

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs the model on one step's chunks against the paged KV cache and samples."""

    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache

    def execute(self, scheduled: list[ScheduledChunk],
                sequences: Mapping[str, SequenceState]) -> ModelRunnerOutput:
        """One forward pass over ``scheduled`` (tokens read from ``sequences``), then a draw
        for every chunk that ends where a token is due."""
        tokens: list[int] = []
        for chunk in scheduled:
            seq = sequences[chunk.seq_id]
            tokens.extend(seq.token_ids[chunk.start_pos:chunk.start_pos + chunk.num_tokens])
        token_ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)  # [N]
        chunks = [PagedChunk(c.block_table, c.start_pos, c.num_tokens,
                             sequences[c.seq_id].prompt_len) for c in scheduled]
        logits = self.model(token_ids, chunks, self.cache)  # [num_chunks, V]
        rows_index = [i for i, c in enumerate(scheduled) if c.samples]
        if not rows_index:
            return ModelRunnerOutput()
        seqs = [sequences[scheduled[i].seq_id] for i in rows_index]
        return self._sample(logits, rows_index, seqs)

    def _sample(self, logits: torch.Tensor, rows_index: list[int],
                seqs: list[SequenceState]) -> ModelRunnerOutput:
        rows = [SamplingRow(params=s.request.params, generator=s.generator,
                            output_token_ids=s.output_ids,
                            prompt_token_ids=s.request.prompt_token_ids) for s in seqs]
        # A seeded row's generator must be where it was should the batched draw fail midway:
        # the rows are then drawn again one by one (see _sample_alone).
        states = [None if s.generator is None else s.generator.get_state() for s in seqs]
        try:
            result = sample(logits if len(rows_index) == logits.shape[0]
                            else logits[rows_index], rows)
        except Exception:  # find the row(s) at fault, sample the rest
            logger.warning("batched sampling failed; sampling the step's rows one by one",
                           exc_info=True)
            return self._sample_alone(logits, rows_index, seqs, rows, states)
        return ModelRunnerOutput({
            s.seq_id: SampledToken(result.token_ids[i], result.logprobs[i],
                                   tuple(result.top_logprobs[i]) if result.top_logprobs else ())
            for i, s in enumerate(seqs)
        })

    @staticmethod
    def _sample_alone(logits: torch.Tensor, rows_index: list[int], seqs: list[SequenceState],
                      rows: list[SamplingRow], states: list[torch.Tensor | None]
                      ) -> ModelRunnerOutput:
        """Each row drawn alone: a row that fails gets its failure, the others their token
        (a seeded row draws the same token alone as in a batch, see model/sampler.py)."""
        draws: dict[str, SampledToken | SamplingFailure] = {}
        for i, (seq, row, state) in enumerate(zip(seqs, rows, states, strict=True)):
            if seq.generator is not None and state is not None:
                seq.generator.set_state(state)
            try:
                one = sample(logits[rows_index[i]:rows_index[i] + 1], [row])
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                draws[seq.seq_id] = SamplingFailure(exc)
                continue
            draws[seq.seq_id] = SampledToken(
                one.token_ids[0], one.logprobs[0],
                tuple(one.top_logprobs[0]) if one.top_logprobs else ())
        return ModelRunnerOutput(draws)
