from openseek.model.transformer import Model, allocate, causal_padding_mask, meta_model

__all__ = ["Model", "allocate", "causal_padding_mask", "meta_model"]
