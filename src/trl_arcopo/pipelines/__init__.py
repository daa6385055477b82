from ..generator import ChunkDenoisingOutput
from .pipeline_self_forcing import SelfForcingPipeline, SelfForcingPipelineOutput


__all__ = ["ChunkDenoisingOutput", "SelfForcingPipeline", "SelfForcingPipelineOutput"]
