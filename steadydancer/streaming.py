"""Block streaming: run a model whose transformer blocks do not all fit in VRAM.

Why: the 14B model in Q4_K is ~9 GB of packed weights, in Q8_0 ~17 GB and in bf16 ~33 GB,
while a 16 GB card also needs room for 35,880-token activations. Streaming keeps the
first `resident` blocks on the GPU and the others *packed* (quantised bytes, or bf16) in
pinned host memory. Each streamed block is copied, on a side stream, into one of two fixed
staging buffers on the GPU while the previous block computes; a CUDA event orders the
block's compute after its copy, and another orders the next copy into that buffer after
the compute. Measured on an H100 at 832x480x81 (docs/benchmarks.md): a block computes for
~85 ms while a Q4_K block crosses PCIe in ~4 ms (bf16: ~15 ms), so the copies hide behind
the compute; streaming every block of Q4_K costs nothing measurable and peaks at 3.5 GiB.

It works through forward hooks on the blocks, so it needs nothing from the caller's block
loop except that blocks run in index order (both our `run_blocks` and ComfyUI's do; a
block run out of order is copied on demand). Only the storage under the weights moves, as
`Module.to` moves it; GGMLTensor attributes such as `tensor_type` survive (parameters that
are views are replaced once by equal non-view tensors, see `_unview`).

The memory option (`memory=` of `steadydancer.model.load_model`):
- "full" (or None): everything on the GPU, no streaming (the default on large cards);
- "auto": as many blocks resident as free VRAM allows after a reserve for activations;
- an integer N >= 0: N resident blocks, the rest streamed.
Any mode other than "full" also chunks each block's FFN over the token axis
(`ffn_chunk_size`), so the 13,824-wide hidden activation never exists for all tokens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import MemoryOptionError

GIB = 1024**3
DEFAULT_FFN_CHUNK = 8192  # tokens per FFN chunk in the memory-saving modes
ENV_RESERVE = "STEADYDANCER_ACTIVATION_RESERVE_GB"


def parse_memory_option(option: str | int | None) -> str | int:
    """Normalise a memory option to "full", "auto" or a resident block count (int >= 0)."""
    if option is None:
        return "full"
    if isinstance(option, bool):
        raise MemoryOptionError(
            f"memory option must be 'full', 'auto' or a block count, got {option!r}"
        )
    if isinstance(option, int):
        if option < 0:
            raise MemoryOptionError(f"resident block count must be >= 0, got {option}")
        return option
    if isinstance(option, str):
        text = option.strip().lower()
        if text in ("full", "off", "none", ""):
            return "full"
        if text == "auto":
            return "auto"
        if text.isdigit():
            return int(text)
    raise MemoryOptionError(
        f"memory option must be 'full', 'auto' or a number of resident blocks (e.g. 20), got {option!r}"
    )


@contextlib.contextmanager
def plain_tensors() -> Iterator[None]:
    """Within the block, tensor subclasses (GGMLTensor) behave as plain tensors.

    Their `__torch_function__` is not called, so an operation sees what is stored: the
    packed bytes of a quantised weight, with no dequantisation and no GGML metadata carried
    over to the result. Use it to size, move or identify a tensor's storage (`tensor_bytes`,
    block streaming, `untyped_storage().data_ptr()`); compute on weights outside it.
    """
    with torch._C.DisableTorchFunctionSubclass():
        yield


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes the tensor's data occupies (packed bytes for a GGMLTensor)."""
    with plain_tensors():
        return t.numel() * t.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of a module, as stored (packed if quantised)."""
    total = sum(tensor_bytes(p) for p in module.parameters())
    return total + sum(tensor_bytes(b) for b in module.buffers())


def default_activation_reserve(dim: int) -> int:
    """VRAM kept free for activations when choosing resident blocks automatically.

    Scaled from the 14B model (dim 5120) at 832x480x81 (35,880 tokens), whose activation
    peak measured on an H100 is 2.9 GiB (docs/benchmarks.md); 4.5 GiB leaves room for the
    allocator's fragmentation and keeps the peak under 15 GiB on a 16 GB card. Activations grow with the token count (720p x 81 frames is
    2.3x the tokens): for longer or larger videos raise it with
    `STEADYDANCER_ACTIVATION_RESERVE_GB` (GiB), which overrides this default.
    """
    env = os.environ.get(ENV_RESERVE)
    if env:
        try:
            return int(float(env) * GIB)
        except ValueError as exc:
            raise MemoryOptionError(f"{ENV_RESERVE} must be a number of GiB, got {env!r}") from exc
    return int(4.5 * GIB * max(dim, 1) / 5120)


def auto_resident_blocks(
    block_bytes: Sequence[int], free_bytes: int, other_bytes: int, reserve_bytes: int
) -> int:
    """How many leading blocks can stay on the GPU.

    `free_bytes` is what the process may allocate, `other_bytes` the weights outside the
    blocks, `reserve_bytes` the activations. If every block fits, all stay resident;
    otherwise room for two streamed blocks in flight (the one computing and the next one
    being copied) is kept too.
    """
    budget = free_bytes - other_bytes - reserve_bytes
    if sum(block_bytes) <= budget:
        return len(block_bytes)
    budget -= 2 * max(block_bytes, default=0)
    count = 0
    for size in block_bytes:
        if size > budget:
            break
        budget -= size
        count += 1
    return count


def free_device_memory(device: torch.device, already_placed: int = 0) -> int:
    """Bytes this process may still allocate on `device`, plus `already_placed` bytes of the
    model that sit there now (they are reused when the model is re-placed).

    The card's free memory plus what PyTorch's cache holds unused, further limited by
    `torch.cuda.set_per_process_memory_fraction` if one is set (the allocator checks the
    cap against its reserved segments, so the cache's unused part counts on both sides).
    """
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    cached = reserved - torch.cuda.memory_allocated(device)
    fraction = _memory_fraction(device)
    if fraction is not None:
        free = min(free, int(total * fraction) - reserved)
    return max(free + cached + already_placed, 0)


def _memory_fraction(device: torch.device) -> float | None:
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is None:
        return None
    try:
        fraction = float(getter(device))
    except (RuntimeError, TypeError):
        return None
    return fraction if fraction < 1.0 else None


ALIGN = 512  # byte alignment of each tensor inside a staging buffer


@dataclass
class _Slot:
    """A streamed block whose weights are in staging buffer `buf` (copied or in flight)."""

    buf: int
    ready: Any  # torch.cuda.Event recorded after the copy, or None on the CPU


class BlockStreamer:
    """Keeps `resident` leading blocks of `model.blocks` on `device` and streams the rest.

    Streamed blocks are copied into two fixed staging buffers on the device, each the size
    of the largest block: the block computing uses one, the next block is copied into the
    other. Fixed buffers instead of fresh allocations keep the caching allocator out of it:
    no per-block allocation, no fragmentation, no memory held by a second stream's pool.
    Use `BlockStreamer.attach(model, device, memory)`; `detach()` moves every block to the
    device again and removes the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str,
        resident: int,
        *,
        ffn_chunk_size: int | None = DEFAULT_FFN_CHUNK,
    ) -> None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise MemoryOptionError("block streaming needs a model with a `blocks` ModuleList")
        self.model = model
        self.device = torch.device(device)
        self.blocks: nn.ModuleList = blocks
        self.resident = min(max(int(resident), 0), len(blocks))
        self.streamed: list[int] = list(range(self.resident, len(blocks)))
        self.ffn_chunk_size = ffn_chunk_size
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        # per streamed block: (tensor object, its pinned host storage, byte offset in a buffer)
        self._host: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._buffers: list[torch.Tensor] = []
        self._free: list[Any] = [None, None]  # event: the last block using buffer b is done
        self._slots: dict[int, _Slot] = {}
        self._hooks: list[Any] = []
        self.copies = 0  # number of block copies made (tests and benchmarks read it)
        self._place()
        self._install()

    # ---------------------------------------------------------------- construction
    @classmethod
    def attach(
        cls,
        model: nn.Module,
        device: torch.device | str,
        memory: str | int | None = "auto",
        *,
        reserve_bytes: int | None = None,
        available_bytes: int | None = None,
        ffn_chunk_size: int | None = DEFAULT_FFN_CHUNK,
    ) -> BlockStreamer | None:
        """Apply a memory option to a model whose weights are on the CPU (or anywhere).

        Returns None for "full" (the model is simply moved to `device`), else the streamer.
        "auto" sizes the resident set from `available_bytes` (default: what the device has
        free for this process, counting the model's bytes already there) minus
        `reserve_bytes` for activations (default `default_activation_reserve`).
        """
        option = parse_memory_option(memory)
        device = torch.device(device)
        if option == "full":
            model.to(device)
            return None
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise MemoryOptionError("block streaming needs a model with a `blocks` ModuleList")
        if option == "auto":
            if device.type != "cuda":
                resident = len(blocks)
            else:
                block_bytes = [module_bytes(b) for b in blocks]
                other = module_bytes(model) - sum(block_bytes)
                if reserve_bytes is None:
                    reserve_bytes = default_activation_reserve(_model_dim(model))
                free = available_bytes
                if free is None:
                    free = free_device_memory(device, _bytes_on(model, device))
                resident = auto_resident_blocks(block_bytes, free, other, reserve_bytes)
        else:
            resident = int(option)
        return cls(model, device, resident, ffn_chunk_size=ffn_chunk_size)

    def _place(self) -> None:
        streamed = {id(t) for i in self.streamed for t in _block_tensors(self.blocks[i])}
        # everything outside the streamed blocks goes to the device
        for module in self.model.modules():
            for p in list(module._parameters.values()):
                if p is not None and id(p) not in streamed:
                    _set_data(p, _to(p, self.device))
            for name, b in list(module._buffers.items()):
                if b is not None and id(b) not in streamed:
                    module._buffers[name] = _to(b, self.device)
        for i in self.streamed:
            _unview(self.blocks[i])
            entries = []
            for t in _block_tensors(self.blocks[i]):
                host = _to(t, torch.device("cpu"))
                if self._cuda:
                    with plain_tensors():
                        host = host.pin_memory()
                _set_data(t, host)
                entries.append((t, host, 0))
            self._host[i] = entries
        self._layout()
        for block in self.blocks:
            if hasattr(block, "ffn_chunk_size") or self.ffn_chunk_size is not None:
                block.ffn_chunk_size = self.ffn_chunk_size

    def _layout(self) -> None:
        """Byte offsets of each streamed tensor in a staging buffer; allocate the two buffers."""
        size = 0
        for i, entries in self._host.items():
            offset = 0
            placed = []
            for t, host, _ in entries:
                placed.append((t, host, offset))
                offset += -(-tensor_bytes(host) // ALIGN) * ALIGN
            self._host[i] = placed
            size = max(size, offset)
        if self._host:
            self._buffers = [
                torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)
            ]

    def _install(self) -> None:
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._make_pre_hook(i)))
            if i in self._host:
                self._hooks.append(block.register_forward_hook(self._make_post_hook(i)))

    def detach(self) -> None:
        """Remove the hooks and put every block on the device (no streaming any more)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self._slots.clear()
        self._buffers = []
        self._free = [None, None]
        for entries in self._host.values():
            for t, host, _ in entries:
                _set_data(t, _to(host, self.device))
        self._host.clear()
        self.streamed = []
        self.resident = len(self.blocks)

    # ---------------------------------------------------------------- streaming
    def _next_streamed(self, after: int) -> int | None:
        """The streamed block that runs after block `after` (wrapping to the next call)."""
        if not self.streamed:
            return None
        later = [i for i in self.streamed if i > after]
        return later[0] if later else self.streamed[0]

    def _views(self, index: int, buf: int) -> list[torch.Tensor]:
        """Typed views of staging buffer `buf` shaped like block `index`'s tensors."""
        data = self._buffers[buf]
        views = []
        with plain_tensors():
            for _, host, offset in self._host[index]:
                n = tensor_bytes(host)
                views.append(data[offset : offset + n].view(host.dtype).view(host.shape))
        return views

    def _issue_copy(self, index: int, keep: int | None) -> _Slot:
        """Start copying block `index` into the buffer that is not `keep` (the one in use)."""
        slot = self._slots.get(index)
        if slot is not None:
            return slot
        buf = 1 if keep == 0 else 0
        for other, s in list(self._slots.items()):
            if s.buf == buf:  # a prefetched block that was not run next: copy it again later
                del self._slots[other]
        views = self._views(index, buf)
        if self._cuda:
            assert self._copy_stream is not None
            with torch.cuda.stream(self._copy_stream), plain_tensors():
                if self._free[buf] is not None:
                    self._copy_stream.wait_event(self._free[buf])
                for (_, host, _), dst in zip(self._host[index], views, strict=True):
                    dst.copy_(host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
        else:
            # on the CPU the copy is synchronous; the buffer logic is the same
            with plain_tensors():
                for (_, host, _), dst in zip(self._host[index], views, strict=True):
                    dst.copy_(host)
            ready = None
        slot = _Slot(buf, ready)
        self._slots[index] = slot
        self.copies += 1
        return slot

    def _make_pre_hook(self, index: int):
        def hook(module: nn.Module, args: Any) -> None:
            keep = None
            if index in self._host:
                in_flight = [s.buf for i, s in self._slots.items() if i != index]
                slot = self._issue_copy(index, keep=in_flight[0] if in_flight else None)
                if self._cuda:
                    torch.cuda.current_stream(self.device).wait_event(slot.ready)
                for (t, _, _), view in zip(
                    self._host[index], self._views(index, slot.buf), strict=True
                ):
                    _set_data(t, view)
                keep = slot.buf
            # overlap: copy the next streamed block into the other buffer while this one computes
            nxt = self._next_streamed(index)
            if nxt is not None and nxt != index:
                self._issue_copy(nxt, keep=keep)

        return hook

    def _make_post_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            slot = self._slots.pop(index, None)
            for t, host, _ in self._host[index]:
                _set_data(t, host)
            if slot is not None and self._cuda:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self._free[slot.buf] = done  # the next copy into this buffer waits for it

        return hook

    def summary(self) -> dict[str, Any]:
        """What is where, for logs and status lines."""
        return {
            "resident_blocks": self.resident,
            "streamed_blocks": len(self.streamed),
            "resident_bytes": sum(module_bytes(self.blocks[i]) for i in range(self.resident)),
            "streamed_bytes": sum(module_bytes(self.blocks[i]) for i in self.streamed),
            "staging_bytes": sum(tensor_bytes(b) for b in self._buffers),
            "ffn_chunk_size": self.ffn_chunk_size,
        }


def _unview(block: nn.Module) -> None:
    """Replace parameters/buffers that are views by equal non-view tensors (same storage).

    Why: swapping `.data` under a view leaves the view's base alive, and the base holds the
    old storage. Tensor subclasses (GGMLTensor) are created through `as_subclass`, i.e. as
    views, so without this their device memory would never be freed when streamed out.
    The new object keeps the class and the attributes (tensor_type, tensor_shape, ...).
    """
    for module in block.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None:
                    continue
                with plain_tensors():
                    if not t._is_view():
                        continue
                    fresh = torch.Tensor._make_subclass(type(t), t.detach(), t.requires_grad)
                fresh.__dict__.update(t.__dict__)
                store[name] = fresh


def _block_tensors(block: nn.Module) -> list[torch.Tensor]:
    return [p for p in block.parameters()] + [b for b in block.buffers()]


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    with plain_tensors():
        return t.detach().to(device)


def _set_data(t: torch.Tensor, data: torch.Tensor) -> None:
    """Swap the storage under a tensor object, keeping the object (and its attributes)."""
    with plain_tensors(), torch.no_grad():
        t.data = data


def _bytes_on(model: nn.Module, device: torch.device) -> int:
    """Bytes of the model already on `device` (they count as available when re-placing)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device == device or (device.index is None and t.device.type == device.type):
            total += tensor_bytes(t)
    return total


def _model_dim(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    dim = getattr(config, "dim", None)
    if isinstance(dim, int):
        return dim
    return 5120


def enable_streaming(
    model: nn.Module,
    device: torch.device | str,
    memory: str | int | None = "auto",
    **kwargs: Any,
) -> BlockStreamer | None:
    """Functional spelling of `BlockStreamer.attach`; stores the streamer on `model.streamer`."""
    streamer = BlockStreamer.attach(model, device, memory, **kwargs)
    model.streamer = streamer
    return streamer
