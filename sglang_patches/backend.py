"""placeholder"""

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend


class SparrowAttnBackend(TorchNativeAttnBackend):
    pass
