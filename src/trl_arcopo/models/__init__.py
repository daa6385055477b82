from .causal_wan import (
    CausalWanTransformer3DModel,
    CausalWanX0Transformer3DModel,
    block_causal_mask,
    teacher_forcing_mask,
)
from .frame_packing import FramePackingAutoencoder
