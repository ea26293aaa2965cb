"""`xkv`: xKV — cross-layer SVD. The prompt's keys of a group of adjacent layers, side by side, share one low-rank
token basis; so do its values. Each batch element stores the group's token latents once and each layer its own
small reconstruction matrix; a layer's keys come back as latent @ basis when attention reads them.

Chang et al., "xKV: Cross-Layer SVD for KV-Cache Compression", 2025 (arXiv:2503.18893).

For a group of `layers` layers and one sequence of n prompt tokens, X = [K_1 | K_2 | …] is n × (layers · kv_heads ·
head_dim); its truncated SVD X ≈ (U_r Σ_r) V_rᵀ keeps r = `key` × that width directions (the paper's defaults for
Llama-3.1-8B, rank 256 keys and 768 values for groups of 4 layers of width 4096, are `key=0.0625,value=0.1875`).
The latents U_r Σ_r (n × r) are stored once per group; each layer keeps its slice of V_rᵀ (r × kv_heads · head_dim).
Keys are decomposed as cached (after RoPE). With `calib=FILE` (written by `kvfold calibrate --method xkv`) the
bases are fitted offline on calibration text and tokens are only projected on them (no SVD per prompt; the bases
are stored once for all sequences) — cheaper, and less exact than the per-prompt SVD of the paper. Approximate: the reconstruction error is the discarded singular values
(Eckart–Young, tested); at rank = width it is exact. Compression runs once, after the prompt's prefill (the group's
last layer triggers it); tokens decoded later stay in full precision. It stands alone: not after eviction (rows
must hold the same tokens in every layer and head), not before a quantizer, not in chunked prefill and not on
sliding-window layers. Decoding attends in the latent space (`GroupLatents.layer_latents`: the query projected on
the key basis, the output on the value basis), never rebuilding the prompt's K and V; the PyTorch reference runs
it (no Triton kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import LowRank, check_fraction, check_int, register


def cross_layer_svd(blocks: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """blocks: [n, width_l] per layer. Returns the shared latents [n, r] and each layer's basis [r, width_l], r =
    min(rank, n, total width), such that latents @ basis_l is the best rank-r fit of block l jointly."""
    stacked = torch.cat([b.float() for b in blocks], dim=1)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    r = max(1, min(rank, s.numel()))
    latents = u[:, :r] * s[:r]
    return latents, list(vh[:r].split([b.shape[1] for b in blocks], dim=1))


@register("xkv")
@dataclass(frozen=True)
class XKV(LowRank):
    """Shared token latents per group of `layers` layers; ranks as fractions of the group's width."""

    paper = "xKV (Chang et al., 2025)"
    positional = "key"

    key: float = 0.0625
    value: float = 0.1875
    layers: int = 4
    calib: str = ""

    def __post_init__(self) -> None:
        for name in ("key", "value"):
            check_fraction(f"xkv: {name}", getattr(self, name), "its rank as a fraction of the group's width layers "
                           "x kv_heads x head_dim", low_open=True)
        check_int("xkv: layers", self.layers, 1, "adjacent layers that share one basis")
        if self.calib:
            from ..calibration import load_calibration
            from ..compressor import Compressor

            tensors, metadata = load_calibration(self.calib, "xkv")
            fitted = Compressor.parse(metadata["method"]).lowrank
            if fitted.layers != self.layers:
                raise KVFoldError(f"xkv: calibration '{self.calib}' was fitted for groups of {fitted.layers} layers, "
                                  f"not {self.layers}: pass layers={fitted.layers} or calibrate again")
            object.__setattr__(self, "_fitted", (tensors, metadata["model"]))

    def check_model(self, config) -> None:
        if not self.calib:
            return
        from ..inspection.profile import check_model_identity

        tensors, fitted = self._fitted
        check_model_identity(fitted, config, f"xkv: calibration '{self.calib}' was fitted on",
                             "kvfold calibrate --method xkv --model M")
        key_rank, value_rank = self.ranks(tensors["groups.0.key_basis"].shape[1])  # the first group's width
        have = tensors["groups.0.key_basis"].shape[0], tensors["groups.0.value_basis"].shape[0]
        if key_rank > have[0] or value_rank > have[1]:
            raise KVFoldError(f"xkv: ranks {key_rank}/{value_rank} asked, calibration '{self.calib}' holds "
                              f"{have[0]}/{have[1]}: lower key=/value= or calibrate with higher ones")

    def fitted_bases(self, group: int, key_rank: int, value_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated key and value bases [rank, group width] of one group (top directions first)."""
        tensors = self._fitted[0]
        return tensors[f"groups.{group}.key_basis"][:key_rank], tensors[f"groups.{group}.value_basis"][:value_rank]

    def ranks(self, width: int) -> tuple[int, int]:
        """(key rank, value rank) for a group of `width` = layers x kv_heads x head_dim columns."""
        return max(1, round(self.key * width)), max(1, round(self.value * width))


@dataclass
class GroupLatents:
    """One group's compressed prompt: per batch element the key and value latents, their positions, and each member
    layer's bases. Read-only once built, so forks share it."""

    key_latents: list[torch.Tensor]  # per batch element [n_b, r_k]
    value_latents: list[torch.Tensor]
    positions: list[torch.Tensor]  # per batch element [n_b] int32
    key_bases: dict[int, list[torch.Tensor]]  # layer index -> per batch element [r_k, kv_heads * head_dim]
    value_bases: dict[int, list[torch.Tensor]]

    def nbytes(self) -> int:
        tensors = [*self.key_latents, *self.value_latents, *self.positions,
                   *(t for bases in (*self.key_bases.values(), *self.value_bases.values()) for t in bases)]
        unique = {id(t): t for t in tensors}  # calibrated bases are one tensor for every sequence
        return sum(t.numel() * t.element_size() for t in unique.values())

    def row_positions(self, kv_heads: int) -> torch.Tensor:
        """Positions of the factored prompt per row [batch * kv_heads, n_max], -1 past a sequence's end (the same
        for every layer of the group: no K/V is rebuilt to say which tokens are held)."""
        width = max(int(p.numel()) for p in self.positions)
        positions = torch.full((len(self.positions), kv_heads, width), -1, device=self.key_latents[0].device)
        for b, pos in enumerate(self.positions):
            positions[b, :, :pos.numel()] = pos.to(positions.device).long()
        return positions.flatten(0, 1)

    def layer_kv(self, layer: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's reconstructed prompt K and V [batch * kv_heads, n_max, head_dim] (latents @ basis, zeros past
        a sequence's end), positions and validity."""
        chunk = self.layer_latents(layer, kv_heads)
        return (torch.bmm(chunk.key_latents, chunk.key_basis), torch.bmm(chunk.value_latents, chunk.value_basis),
                chunk.positions, chunk.valid)

    def layer_latents(self, layer: int, kv_heads: int):
        """The layer's prompt as a `kernels.reference.LatentChunk` (rows = batch * kv_heads): the group's latents,
        one copy per head row (the batched products take a row per head), and the layer's basis sliced per head;
        padded with zeros to the longest sequence and the largest rank of the batch."""
        from ..kernels.reference import LatentChunk

        positions = self.row_positions(kv_heads)
        width = positions.shape[1]

        def rows(latents: list[torch.Tensor]) -> torch.Tensor:  # per element [n_b, r_b] -> [rows, width, r]
            rank = max(lat.shape[1] for lat in latents)  # r_b <= n_b: a short prompt has a smaller rank
            padded = torch.stack([torch.nn.functional.pad(lat.float(), (0, rank - lat.shape[1], 0, width - lat.shape[0]))
                                  for lat in latents])
            return padded.unsqueeze(1).expand(-1, kv_heads, -1, -1).flatten(0, 1)

        def bases(per_element: list[torch.Tensor]) -> torch.Tensor:  # [r_b, kv_heads * dim] -> [rows, r, dim]
            rank = max(b.shape[0] for b in per_element)
            return torch.cat([torch.nn.functional.pad(b.float(), (0, 0, 0, rank - b.shape[0])).view(
                rank, kv_heads, -1).transpose(0, 1) for b in per_element])

        return LatentChunk(rows(self.key_latents), bases(self.key_bases[layer]), rows(self.value_latents),
                           bases(self.value_bases[layer]), positions, positions >= 0)


class LayerGroup:
    """Coordinates the layers that share one xKV basis: each reports its prompt after storing it; the last one to
    report compresses the group and moves every member's prompt tokens into the shared latents."""

    def __init__(self, method: XKV, members: list[int]) -> None:
        self.method, self.members = method, members
        self.arrived: dict[int, object] = {}

    def report(self, layer) -> None:
        self.arrived[layer.layer_idx] = layer
        if set(self.arrived) == set(self.members):
            layers, self.arrived = [self.arrived[i] for i in self.members], {}
            latents = self._compress(layers)
            for member in layers:  # the prompt now lives in the latents: its pages go back to the allocator
                member.full.clear()
                member.full.pool.trim()
                member.lowrank = latents

    def _compress(self, layers) -> GroupLatents:
        first = layers[0]
        kv_heads, dim, batch = first.kv_heads, first.head_dim, first.batch_size
        stores = [layer.full_rows()[0] for layer in layers]  # per layer {"k", "v", "pos"} [batch * kv_heads, n, ...]
        counts = first.full.lengths.view(batch, kv_heads)
        if any(not torch.equal(layer.full.lengths, first.full.lengths) for layer in layers) or \
                (counts != counts[:, :1]).any():
            raise KVFoldError("xkv: the layers of a group hold different tokens; xkv needs every layer and KV head "
                              "to hold the same prompt (no eviction before it)")
        key_rank, value_rank = self.method.ranks(len(layers) * kv_heads * dim)  # of this group's own width
        fitted = fitted_layers = None
        if self.method.calib:
            fitted = self.method.fitted_bases(self.members[0] // self.method.layers, key_rank, value_rank)
            fitted_layers = [[b.to(first.device).contiguous() for b in basis.split(kv_heads * dim, dim=1)]
                             for basis in fitted]
        result = GroupLatents([], [], [], {i.layer_idx: [] for i in layers}, {i.layer_idx: [] for i in layers})
        for b in range(batch):
            n = int(counts[b, 0])

            def block(tensor: torch.Tensor) -> torch.Tensor:  # [rows, n, dim] -> [n, kv_heads * dim] of element b
                return tensor.view(batch, kv_heads, -1, dim)[b, :, :n].transpose(0, 1).reshape(n, kv_heads * dim)

            for latents, bases, index, rank in ((result.key_latents, result.key_bases, 0, key_rank),
                                                (result.value_latents, result.value_bases, 1, value_rank)):
                blocks = [block(s["kv"[index]].float()) for s in stores]
                if fitted is None:
                    shared, per_layer = cross_layer_svd(blocks, rank)
                else:  # project on the calibrated basis (orthonormal rows)
                    basis = fitted[index].to(blocks[0].device)
                    shared = torch.cat(blocks, dim=1) @ basis.T
                    per_layer = fitted_layers[index]
                latents.append(shared)
                for layer, basis in zip(layers, per_layer):
                    bases[layer.layer_idx].append(basis.contiguous())
            result.positions.append(stores[0]["pos"].view(batch, kv_heads, -1)[b, 0, :n].to(torch.int32).clone())
        return result
