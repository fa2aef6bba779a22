"""What a compiled XLA program does, read from its optimised HLO text (`compiled.as_text()`).

XLA's cost analysis gives only whole-program totals; pod_plan needs the collectives (kind,
count, bytes) and, for `--breakdown`, which kernels move the bytes and do the FLOPs. Both are
read here from the instructions of the entry computation:
- a kernel's bytes are what it reads from and writes to HBM at its boundary: its operands and
  outputs that live in HBM (a layout with memory space S(1), the TPU's VMEM, is on chip), each
  once; the slices XLA prefetches into VMEM (slice-start, copy-start) count as the HBM reads
  they are. Re-reads inside a kernel (a convolution tiling its operands) are not seen, so the
  sum is a floor on the program's HBM traffic, where XLA's cost analysis counts more;
- its FLOPs are those of the convolutions and dots it contains, 2 per multiply-add: a
  convolution does (rhs elements / rhs output features) multiply-adds per output element, a dot
  the product of its contracting dimensions.
Shapes are per device, as the SPMD-partitioned program runs them. `part` names the part of
the train step a kernel belongs to, from the name scopes in its op_name (the model's modules,
and the 'matching', 'loss' and 'optimizer' scopes of losses.py and train.py).
"""

import collections
import dataclasses
import math
import re

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
          'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
          'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 1, 'u4': 1}
# `  %name = TYPE opcode(operands), attributes` (TYPE may be a tuple in parentheses).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?')
# A layout's memory space other than 0 (HBM): S(1) is the TPU's on-chip VMEM, S(2) its SMEM.
_ON_CHIP = re.compile(r'S\([1-9]\d*\)')
_COMPUTATION = re.compile(r'^(ENTRY )?%(\S+) .*\{$')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def _typed(shape: str) -> list[tuple[str, tuple[int, ...], bool]]:
  """(dtype, dims, on chip) of every array of `shape` (a tuple's in order)."""
  return [(dtype, tuple(int(d) for d in dims.split(',') if d), bool(_ON_CHIP.search(layout)))
          for dtype, dims, layout in _ARRAY.findall(shape) if dtype in _BYTES]


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, dims) for dtype, dims, _ in _typed(shape)]


def _nbytes(array) -> int:
  return _BYTES[array[0]] * math.prod(array[1])


def shape_bytes(shape: str) -> int:
  return sum(map(_nbytes, _arrays(shape)))


def _hbm_bytes(inst: 'Instruction', shapes: dict[str, str]) -> int:
  """What `inst` reads from and writes to HBM: its operands and results that live there, not
  in on-chip memory (VMEM prefetches count as the HBM read they are). An async start's result
  tuple repeats its operands first (aliases, not copies), which are dropped; a slice-start
  reads only its slice."""
  operands = [a for o in inst.operands for a in _typed(shapes.get(o, ''))]
  results = _typed(inst.shape)
  if (inst.opcode.endswith('-start')
      and [a[:2] for a in results[:len(operands)]] == [a[:2] for a in operands]):
    results = [a for a in results[len(operands):] if a[1]]  # Less the scalar context.
    if inst.opcode == 'slice-start':
      read = sum(map(_nbytes, results)) if any(not a[2] for a in operands) else 0
      return read + sum(_nbytes(a) for a in results if not a[2])
  return sum(_nbytes(a) for a in operands + results if not a[2])


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attributes: str

  @property
  def op_name(self) -> str:
    match = re.search(r'op_name="([^"]*)"', self.attributes)
    return match.group(1) if match else ''

  @property
  def calls(self) -> list[str]:
    match = re.search(r'(?:calls|to_apply)=%([\w.-]+)', self.attributes)
    return [match.group(1)] if match else []


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: its instructions}, and the entry computation's name."""
  computations, entry, current = {}, '', None
  for line in hlo_text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = computations.setdefault(match.group(2), [])
        entry = match.group(2) if match.group(1) else entry
      continue
    if line.startswith('}'):
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match:
      name, shape, opcode, operands, attributes = match.groups()
      current.append(Instruction(name, shape, opcode, re.findall(r'%([\w.-]+)', operands),
                                 attributes))
  return computations, entry


def _dot_or_conv_flops(inst: Instruction, shapes: dict[str, str]) -> float:
  out = _arrays(inst.shape)
  if not out or len(inst.operands) < 2:
    return 0.0
  out_elements = math.prod(out[0][1])
  lhs, rhs = (_arrays(shapes.get(o, '')) for o in inst.operands[:2])
  if not lhs or not rhs:
    return 0.0
  if inst.opcode == 'convolution':
    labels = re.search(r'dim_labels=\w+_(\w+)->', inst.attributes)
    o_dim = labels.group(1).index('o') if labels else len(rhs[0][1]) - 1
    return 2.0 * out_elements * math.prod(rhs[0][1]) / rhs[0][1][o_dim]
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', inst.attributes)
  dims = [int(d) for d in contracting.group(1).split(',') if d] if contracting else []
  return 2.0 * out_elements * math.prod(lhs[0][1][d] for d in dims)


@dataclasses.dataclass
class Kernel:
  """One instruction of the entry computation, with what it moves and computes."""
  name: str
  opcode: str
  op_name: str
  bytes: int
  flops: float


def kernels(hlo_text: str) -> list[Kernel]:
  computations, entry = parse(hlo_text)
  shapes = {i.name: i.shape for insts in computations.values() for i in insts}
  flops_memo: dict[str, float] = {}

  def computation_flops(name: str) -> float:
    if name not in flops_memo:
      flops_memo[name] = 0.0  # Guards against cycles while it is computed.
      flops_memo[name] = sum(instruction_flops(i) for i in computations.get(name, []))
    return flops_memo[name]

  def instruction_flops(inst: Instruction) -> float:
    if inst.opcode in ('convolution', 'dot'):
      return _dot_or_conv_flops(inst, shapes)
    if inst.opcode == 'fusion' or inst.opcode.endswith('-start') or inst.opcode == 'call':
      return sum(computation_flops(c) for c in inst.calls)
    return 0.0

  free = ('parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
          'partition-id', 'replica-id')
  result = []
  for inst in computations.get(entry, []):
    if inst.opcode in free or inst.opcode.endswith('-done'):
      continue
    result.append(Kernel(inst.name, inst.opcode, inst.op_name, _hbm_bytes(inst, shapes),
                         instruction_flops(inst)))
  return result


# A scope as it appears in op_name, wrapped in the transformations that traced it.
_WRAPPED = re.compile(r'^(?:[\w]+\()*([\w.-]+)\)*$')
_MODEL_PARTS = {'backbone': 'backbone', 'fpn': 'fpn', 'cls_head': 'heads', 'box_head': 'heads'}


def part(kernel: Kernel) -> str:
  """The part of the train step `kernel` belongs to: 'backbone', 'fpn', 'heads' (each
  ' forward' or ' backward'), 'matching', 'loss forward' / 'loss backward', 'optimizer',
  'collectives', 'copies' (the layout copies and copy-start prefetches XLA adds) or 'other'
  (among them the slice-start prefetches into VMEM, which carry no scope)."""
  if kernel.opcode.removesuffix('-start') in COLLECTIVES:
    return 'collectives'
  scopes = [m.group(1) for m in map(_WRAPPED.match, kernel.op_name.split('/')) if m]
  direction = ' backward' if 'transpose(' in kernel.op_name else ' forward'
  for i, scope in enumerate(scopes):
    if scope == 'RetinaNet' and i + 1 < len(scopes):
      return _MODEL_PARTS.get(scopes[i + 1], 'model') + direction
    if scope in ('matching', 'optimizer'):
      return scope
    if scope == 'loss':
      return 'loss' + direction
  if kernel.opcode in ('copy', 'copy-start'):
    return 'copies'
  return 'other'


def by_part(kernel_list: list[Kernel]) -> dict[str, dict[str, float]]:
  """{part: {'bytes', 'flops', 'kernels'}}, largest bytes first."""
  found = collections.defaultdict(lambda: {'bytes': 0, 'flops': 0.0, 'kernels': 0})
  for k in kernel_list:
    entry = found[part(k)]
    entry['bytes'] += k.bytes
    entry['flops'] += k.flops
    entry['kernels'] += 1
  return dict(sorted(found.items(), key=lambda kv: -kv[1]['bytes']))


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the program's collectives, per device. An async pair counts
  once, by its -start, whose result is (operands..., results...): only the results count."""
  computations, _ = parse(hlo_text)
  found = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
  for insts in computations.values():
    for inst in insts:
      kind = inst.opcode.removesuffix('-start')
      if kind in COLLECTIVES:
        arrays = _arrays(inst.shape)
        if inst.opcode.endswith('-start') and kind != 'all-reduce':
          arrays = arrays[len(arrays) // 2:]  # (operands..., results...) of an async start.
        found[kind]['count'] += 1
        found[kind]['bytes'] += sum(map(_nbytes, arrays))
  return {k: dict(v) for k, v in sorted(found.items())}
