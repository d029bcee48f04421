from openseek.model.transformer import Model, causal_padding_mask

__all__ = ["Model", "causal_padding_mask"]
