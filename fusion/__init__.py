"""Cross-modal attention built on `multimodal.layers`: cross-modal encoders, dual-stream
co-attention, single-stream fusion and Flamingo's gated cross-attention."""

from fusion.co_attention import CoAttentionEncoder, CoAttentionOutput
from fusion.cross_modal import cross_modal_encoder
from fusion.gated import GatedCrossAttention, GatedDecoder
from fusion.single_stream import SingleStreamEncoder, SingleStreamOutput

__all__ = [
    "CoAttentionEncoder",
    "CoAttentionOutput",
    "GatedCrossAttention",
    "GatedDecoder",
    "SingleStreamEncoder",
    "SingleStreamOutput",
    "cross_modal_encoder",
]
