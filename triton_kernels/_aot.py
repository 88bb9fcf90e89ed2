"""What a Triton kernel module declares so the GPU compile check can build it ahead of time."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AotSpec:
    """One kernel in one tuning configuration.

    signature: {argument: Triton type} for every argument, e.g. {"x_ptr": "*fp32", "n": "i32",
    "BLOCK": "constexpr"}; constexprs: {name: value} for the constexpr arguments; name: a label for
    the report (defaults to the kernel's name plus its constexprs).
    """
    kernel: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    name: str = ""

    def label(self):
        if self.name:
            return self.name
        consts = ",".join("%s=%s" % kv for kv in sorted(self.constexprs.items()))
        return "%s[%s|w%d s%d]" % (self.kernel.fn.__name__, consts, self.num_warps, self.num_stages)
