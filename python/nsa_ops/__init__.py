"""nsa_ops: NSA compressed attention (torch_npu.npu_nsa_compress_attention) on CPU (and CUDA).

Importing the package loads the compiled operator library (see :mod:`nsa_ops._lib` for where it is
looked for) and registers ``torch.ops.nsa.compress_attention`` (and ``compress_attention_reference``,
the plain-loop oracle). The contract is docs/spec/compress_attention.md.
"""

from ._lib import library_path, load_library

load_library()

from .ops import _compress_attention_autograd  # noqa: E402

_compress_attention_autograd.register()

from .ops import _compress_autograd  # noqa: E402

_compress_autograd.register()

from .ops import _window_attention_autograd  # noqa: E402

_window_attention_autograd.register()

from .ops import _select_attention_autograd  # noqa: E402

_select_attention_autograd.register()

from .masks import (  # noqa: E402
    compressed_lengths,
    lengths_from_prefix_sums,
    make_atten_mask,
    make_topk_mask,
    prefix_sums,
    selection_lengths,
)
from .ops.compress_attention import (  # noqa: E402
    CompressAttentionOutput,
    compress_attention,
    cpu_isa,
    npu_nsa_compress_attention,
)
from .ops.compress import (  # noqa: E402
    CompressOutput,
    compress,
    compressed_offsets,
    npu_nsa_compress,
    npu_nsa_compress_grad,
)
from .ops.window_attention import (  # noqa: E402
    WindowAttentionOutput,
    compressed_atten_mask,
    npu_fusion_attention,
    npu_fusion_attention_grad,
    sliding_window_attention,
)
from .ops.select_attention import (  # noqa: E402
    SelectAttentionOutput,
    npu_nsa_select_attention,
    npu_nsa_select_attention_grad,
    select_attention,
)
from .ops.select_attention_infer import npu_nsa_select_attention_infer  # noqa: E402
from .ops.paged_window_attention import paged_window_attention  # noqa: E402
from .ops.compress_infer import npu_nsa_compress_infer  # noqa: E402
from .ops.compress_attention_infer import npu_nsa_compress_attention_infer  # noqa: E402
from .isa_report import CpuIsaReport, cpu_isa_report  # noqa: E402
from .output_cache import CpuOutputCacheInfo, cpu_output_cache_info, empty_cpu_output_cache  # noqa: E402
from .stats import query_lengths, softmax_stats_dense, softmax_stats_pack, softmax_stats_view  # noqa: E402
from .layer import NSAAttention, NSAAux  # noqa: E402
from .cache import NSACache  # noqa: E402

__all__ = [
    "CompressAttentionOutput",
    "compress_attention",
    "npu_nsa_compress_attention",
    "compressed_lengths",
    "CompressOutput",
    "compress",
    "compressed_offsets",
    "npu_nsa_compress",
    "npu_nsa_compress_grad",
    "WindowAttentionOutput",
    "compressed_atten_mask",
    "npu_fusion_attention",
    "npu_fusion_attention_grad",
    "sliding_window_attention",
    "SelectAttentionOutput",
    "npu_nsa_select_attention",
    "npu_nsa_select_attention_grad",
    "select_attention",
    "npu_nsa_select_attention_infer",
    "paged_window_attention",
    "npu_nsa_compress_infer",
    "npu_nsa_compress_attention_infer",
    "selection_lengths",
    "prefix_sums",
    "lengths_from_prefix_sums",
    "make_atten_mask",
    "make_topk_mask",
    "query_lengths",
    "softmax_stats_view",
    "softmax_stats_dense",
    "softmax_stats_pack",
    "cpu_isa",
    "cpu_isa_report",
    "CpuOutputCacheInfo",
    "cpu_output_cache_info",
    "empty_cpu_output_cache",
    "CpuIsaReport",
    "library_path",
    "load_library",
    "NSAAttention",
    "NSAAux",
    "NSACache",
]
