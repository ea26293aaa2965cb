"""kvfold: real, composable, measured KV-cache compression for Hugging Face causal LMs."""

from .api import Answer, compress, generate, make_cache, split_prompt
from .cache import KVFoldCache
from .compressor import Compressor, registered_methods
from .errors import KVFoldError
from .methods import register
from .models import load_model
from .perplexity import TeacherForced, teacher_forced

__version__ = "0.1.0"

__all__ = [
    "Answer", "Compressor", "KVFoldCache", "KVFoldError", "compress", "generate", "load_model", "make_cache",
    "register", "registered_methods", "split_prompt", "TeacherForced", "teacher_forced", "__version__",
]
