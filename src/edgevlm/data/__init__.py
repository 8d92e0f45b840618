"""Data: LLaVA-format conversation files read without torch (samples.py, which the runtime's
benchmark also reads), their training batches (llava.py), answer metrics (metrics.py) and the
synthetic shapes sets (shapes.py). Importing this package loads neither torch nor transformers."""

from edgevlm.data.llava import (
    DEFAULT_MAX_LENGTH,
    IGNORE,
    LONG_SAMPLES,
    Collator,
    Encoded,
    FitReport,
    expand_images,
    fit_samples,
    pixel_inputs,
    pixels_of,
    render_chat,
    resolve_max_length,
    text_inputs,
)
from edgevlm.data.samples import IMAGE_TAG, ROLES, Sample, load_samples, open_image, to_messages

__all__ = ["DEFAULT_MAX_LENGTH", "IGNORE", "IMAGE_TAG", "LONG_SAMPLES", "ROLES", "Collator",
           "Encoded", "FitReport", "Sample", "expand_images", "fit_samples", "load_samples",
           "open_image", "pixel_inputs", "pixels_of", "render_chat", "resolve_max_length",
           "text_inputs", "to_messages"]
