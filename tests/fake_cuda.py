"""A stand-in for CUDA's asynchronous copies, for testing stream and event use on a machine without a GPU.

A stream is a queue of deferred host-to-device copies: `.to(cuda:N, non_blocking=True)` returns an
empty CPU tensor and queues the copy on the current stream of device N; the copy runs (reading its
source then, as the GPU's copy engine would) only when something waits for it: an event recorded
after it is synchronised or waited on, its stream is synchronised or waited on, or `finish()` runs
every queue (the GPU catching up). Code that reuses a pinned buffer before the copy out of it has
run, because it waited on the wrong device's stream or not at all, hands out the buffer's new
contents in place of the old: the race a real GPU loses now and then, lost every time.
"""

import contextlib

import torch


class FakeStream:
    def __init__(self, fake: "FakeCuda", device: int):
        self.fake, self.device = fake, device
        self.queue: list = []
        self.done = 0

    def run(self, upto: int | None = None) -> None:
        upto = len(self.queue) if upto is None else upto
        while self.done < upto:
            self.queue[self.done]()
            self.done += 1

    def synchronize(self) -> None:
        self.run()

    def wait_stream(self, other: "FakeStream") -> None:
        other.run()

    def wait_event(self, event: "FakeEvent") -> None:
        event.synchronize()

    def query(self) -> bool:
        return self.done == len(self.queue)


class FakeEvent:
    def __init__(self, fake: "FakeCuda", *args, **kwargs):
        self.fake = fake
        self.stream: FakeStream | None = None
        self.mark = 0

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = stream or self.fake.current_stream()
        self.mark = len(self.stream.queue)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.run(self.mark)

    def wait(self, stream: FakeStream | None = None) -> None:
        self.synchronize()

    def query(self) -> bool:
        return self.stream is None or self.stream.done >= self.mark


class FakeCuda:
    def __init__(self, current_device: int = 0):
        self.current_device = current_device
        self.defaults: dict[int, FakeStream] = {}
        self.current: dict[int, FakeStream] = {}
        self.streams: list[FakeStream] = []
        self.copies_on: list[tuple[int, bool]] = []
        """(device, on its default stream) of every host-to-device copy queued."""

    def _index(self, device) -> int:
        if device is None:
            return self.current_device
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current_device if device.index is None else device.index

    def default_stream(self, device=None) -> FakeStream:
        index = self._index(device)
        if index not in self.defaults:
            self.defaults[index] = self.new_stream(index)
        return self.defaults[index]

    def new_stream(self, index: int) -> FakeStream:
        stream = FakeStream(self, index)
        self.streams.append(stream)
        return stream

    def current_stream(self, device=None) -> FakeStream:
        index = self._index(device)
        return self.current.get(index) or self.default_stream(index)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None):
        if stream is None:
            yield
            return
        before_device, before = self.current_device, self.current.get(stream.device)
        self.current_device, self.current[stream.device] = stream.device, stream
        try:
            yield
        finally:
            self.current_device = before_device
            if before is None:
                self.current.pop(stream.device)
            else:
                self.current[stream.device] = before

    def finish(self) -> None:
        for stream in self.streams:
            stream.run()

    def install(self, monkeypatch) -> "FakeCuda":
        fake = self
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = kwargs.get("device")
            for a in args:
                if isinstance(a, (str, torch.device)):
                    target = a
            if target is None or torch.device(target).type != "cuda":
                return real_to(tensor, *args, **kwargs)
            dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), tensor.dtype)
            stream = fake.current_stream(target)
            out = torch.empty(tensor.shape, dtype=dtype)
            fake.copies_on.append((stream.device, stream is fake.default_stream(stream.device)))
            if not kwargs.get("non_blocking", False):
                stream.run()
                out.copy_(tensor)
                return out
            stream.queue.append(lambda: out.copy_(tensor))
            return out

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: t.clone())
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, *a, **k: True)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: None)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, **k: fake.new_stream(fake._index(device)))
        monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(fake))
        monkeypatch.setattr(torch.cuda, "current_stream", fake.current_stream)
        monkeypatch.setattr(torch.cuda, "default_stream", fake.default_stream)
        monkeypatch.setattr(torch.cuda, "stream", fake.stream)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current_device)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        return self


class CudaTensorsOnCpu(torch.overrides.TorchFunctionMode):
    """Inside it, a factory call that names a CUDA device (`torch.zeros(..., device="cuda")`, a module's
    parameters built on `cuda:1`) makes its tensor on the CPU: with `FakeCuda.install`, an object whose
    device is CUDA (a trainer, a loader) can be built and run on a machine without one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def fake_cuda_devices(monkeypatch, capabilities: list[tuple[int, int]], free_bytes: int = 80 << 30) -> None:
    """Pretend `len(capabilities)` CUDA devices exist, device i of compute capability capabilities[i],
    each with `free_bytes` free."""
    def index(device=None) -> int:
        if device is None:
            return 0
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return device.index or 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[index(device)])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, free_bytes))
