"""Inside the engine: find the fresh IAPT prefills of a step and write P_l into their
placeholder rows before each decoder layer.

The engine hands a decoder loop one flat batch of rows (all requests' new tokens, one segment per
request; ``query_start_loc`` bounds the segments). A segment that starts at position 0 with a
placeholder header (placeholders.py) is a fresh IAPT prefill: its rows are the T placeholders,
the prompt, and after a preemption the tokens generated before it. Before layer l, the
placeholder rows' layer input becomes exactly P_l — the soft tokens enter a layer as its input,
at the positions just before the prompt — and the layer itself computes their keys and values into
the paged cache. The injection runs after the layer's own input norm (vllm_model.py), which
already formed every row's input and its norm: the generators pool those, and only the T rows per
request are overwritten (input P_l, normed input norm(P_l)). Segments that do not start at
0 (decode steps, prompts whose placeholders a salted prefix-cache hit already holds) run the
plain layers: their placeholder keys and values are in the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from iapt_fast.generator import functional
from iapt_fast.serve.adapters import ServedAdapters
from iapt_fast.serve.placeholders import PlaceholderCodec

__all__ = ["FreshPrefill", "find_fresh_prefills", "LayerInjector"]


@dataclass(frozen=True)
class FreshPrefill:
    """One request whose placeholders this step computes: rows start..start+T−1 are the
    placeholders, rows start+T..start+T+prompt_length−1 the prompt the generators pool."""

    start: int
    slot: int
    num_tokens: int
    prompt_length: int


def find_fresh_prefills(input_ids: Tensor, positions: Tensor, query_start_loc: Tensor, codec: PlaceholderCodec,
                        adapters: ServedAdapters) -> list[FreshPrefill]:
    """The fresh IAPT prefills among the step's segments.

    Args:
        input_ids, positions: [R] the step's rows.
        query_start_loc: [S + 1] segment bounds (row offsets).
    """
    bounds = query_start_loc.tolist()
    header = codec.min_soft_tokens
    # Decode rows and short segments cannot hold a header; bounds past the rows are padding.
    segments = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e - s > header and e <= positions.shape[0]]
    if not segments:
        return []
    starts = torch.tensor([s for s, _ in segments], device=positions.device)
    first_pos = positions[starts].tolist()
    heads = input_ids[starts[:, None] + torch.arange(header, device=starts.device)].tolist()
    fresh = []
    for (start, end), pos, head in zip(segments, first_pos, heads):
        decoded = codec.decode(head) if pos == 0 else None
        if decoded is None:
            continue
        slot, length = decoded
        num_tokens = adapters.slots[slot].num_tokens
        if num_tokens + length > end - start:
            raise RuntimeError(f"a placeholder header announces {num_tokens} + {length} rows but its segment has "
                               f"{end - start}: the prompt was split (chunked prefill must be off)")
        fresh.append(FreshPrefill(start, slot, num_tokens, length))
    return fresh


class LayerInjector:
    """Computes P_l for a step's fresh prefills and writes it into their placeholder rows.

    One ``prompt_generator`` call per layer per shape group (pack) of the adapters present.

    Args:
        adapters: the served adapters (weights packed per group).
        fresh: this step's fresh prefills (non-empty).
        num_rows: R, the step's rows.
        device: the rows' device.
    """

    def __init__(self, adapters: ServedAdapters, fresh: list[FreshPrefill], num_rows: int,
                 device: torch.device) -> None:
        groups: dict[int, list[FreshPrefill]] = {}
        packs = {}
        for item in fresh:
            pack = adapters.slots[item.slot].pack
            groups.setdefault(id(pack), []).append(item)
            packs[id(pack)] = pack
        self._launches = []
        # The rows whose layer outputs are read (by the next layer, or for logits after the last):
        # all but the fresh prefills' T placeholders, computed only for their keys and values.
        keep = torch.ones(num_rows, dtype=torch.bool)
        for item in fresh:
            keep[item.start:item.start + item.num_tokens] = False
        self.kept_rows = torch.nonzero(keep).flatten().to(device)
        for key, items in groups.items():
            pack = packs[key]
            longest = max(item.prompt_length for item in items)
            offsets = torch.arange(longest)
            lengths = torch.tensor([item.prompt_length for item in items])
            mask = offsets[None] < lengths[:, None]
            starts = torch.tensor([item.start + item.num_tokens for item in items])
            # Rows past a prompt's end read its first row; the mask keeps them out of the pool.
            gather = torch.where(mask, starts[:, None] + offsets[None], starts[:, None]).reshape(-1)
            num_tokens = items[0].num_tokens
            targets = (torch.tensor([item.start for item in items])[:, None] + torch.arange(num_tokens)[None]).reshape(-1)
            ids = torch.tensor([adapters.slots[item.slot].index for item in items])
            self._launches.append((pack, gather.to(device), mask.to(device), targets.to(device),
                                   ids.to(device) if len(pack.names) > 1 else None, len(items), longest))

    def __call__(self, layer: int, normed: Tensor, layer_input: Tensor,
                 input_norm: Callable[[Tensor], Tensor]) -> None:
        """Make P_layer the placeholder rows' layer input, in place: ``layer_input`` [R, d] (the
        residual stream entering the layer) gets P_l there and ``normed`` [R, d] (the layer's input
        norm of it) gets input_norm(P_l). The generators pool the prompt rows of ``normed`` or of
        ``layer_input``, as each adapter was trained (``pool_input``).

        Args:
            input_norm: the layer's own input norm (one tensor in, its norm out).
        """
        for pack, gather, mask, targets, ids, batch, longest in self._launches:
            pooled_from = normed if pack.key.pool_input == "normed" else layer_input
            source = pooled_from.index_select(0, gather).view(batch, longest, -1)
            products = pack.inference_products(layer, "auto", source.device)
            soft = functional.prompt_generator(source, mask, **pack.weights[layer], adapter_ids=ids,
                                               backend="auto", rational_version=pack.key.rational_version,
                                               check_ids=False, weight_products=products)
            soft = soft.reshape(-1, soft.shape[-1]).to(layer_input.dtype)
            layer_input.index_copy_(0, targets, soft)
            normed.index_copy_(0, targets, input_norm(soft))
