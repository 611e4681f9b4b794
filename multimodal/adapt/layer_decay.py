"""How deep each parameter sits below the top of its transformer stack: the exponent of
layer-wise learning-rate decay (BEiT, ELECTRA, timm's `layer_decay`) and the order in which
gradual unfreezing (ULMFiT) releases parameters.

Rules (the order is that of module registration, which in our towers, timm's and open_clip's
is the order of computation; tied parameters count once, under their first name):

1. A *stack* is an `nn.ModuleList` / `nn.Sequential` with at least one block whose attribute
   name is one of `STACK_NAMES`: our `Transformer.blocks`, timm's ViT `blocks`, open_clip's
   `transformer.resblocks`. A stack inside another stack is part of its block.
2. The *tower* of a stack is its outermost enclosing module that holds no other stack: in
   CLIP, `image_tower` and `text_tower`; in a captioner, the image tower and the decoder; in
   `EncoderDecoderLM`, `encoder` and `decoder`; in a single-tower model, the whole model.
3. Inside a tower with N blocks, block i (0-based from the input) has depth N - i. Any other
   parameter is *before* the blocks, depth N + 1, or *after* them, depth 0: in the module
   that holds both it and the stack, the child holding it is registered before or after the
   child holding the stack (patch / token embeddings, stem, pre-norm: before; final norm,
   pooling, projection, head: after). PyTorch keeps no order between a module's own
   `nn.Parameter`s and its children, so a parameter held there directly is before only if
   named in `INPUT_NAMES` (class token, registers, position embeddings) and after otherwise
   (open_clip's `proj`, `text_projection`, `logit_scale`).
4. Parameters outside every tower have depth 0 (CLIP's projections and logit_scale, a VQA
   classifier, a task's heads), with two exceptions for inputs: a parameter before every
   stack (the embedding `EncoderDecoderLM` shares between encoder and decoder) has depth
   N + 1 of the first stack; and open_clip's `CLIP`, which keeps its text tower at the root
   next to `visual`, has `token_embedding` / `positional_embedding` counted as inputs
   (depth N + 1) of the sibling `transformer.resblocks`.

Consequences worth knowing: a tied LM head shares the embedding's depth (N + 1); a relative
position bias shared by all blocks (T5) is held before them (N + 1, BEiT gives a shared bias the
top rate); blocks named otherwise (Hugging Face `layer` / `layers`, co-attention's
`text_blocks`) are not recognised, and their parameters fall under rule 3 or 4 like any other.
"""

from __future__ import annotations

from torch import nn

STACK_NAMES = ("blocks", "resblocks")
# parameters (and modules) that feed the blocks although a module may hold them next to its
# stack without telling where: our ViT's, timm's and open_clip's tokens and embeddings
INPUT_NAMES = (
    "cls_token",
    "registers",
    "reg_token",
    "dist_token",
    "mask_token",
    "pos_embed",
    "class_embedding",
    "positional_embedding",
    "token_embedding",
)


def _under(prefix: str, name: str) -> bool:
    """Whether `name` is `prefix` or lies inside the module `prefix` ("" is the root)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def find_stacks(model: nn.Module) -> dict[str, int]:
    """Module names of the block stacks of `model` (rule 1) -> their number of blocks, in
    registration order."""
    stacks: dict[str, int] = {}
    for name, module in model.named_modules():
        is_stack = (
            name.rsplit(".", 1)[-1] in STACK_NAMES
            and isinstance(module, nn.ModuleList | nn.Sequential)
            and len(module) > 0
        )
        if is_stack and not any(_under(outer, name) for outer in stacks):
            stacks[name] = len(module)
    return stacks


def _tower(stack: str, stacks: dict[str, int]) -> str:
    """The outermost module around `stack` that holds no other stack (rule 2)."""
    parts = stack.split(".")
    for end in range(len(parts) + 1):
        prefix = ".".join(parts[:end])
        if sum(_under(prefix, other) for other in stacks) == 1:
            return prefix
    return stack  # unreachable: the stack itself holds only itself


def _before(model: nn.Module, name: str, stack: str) -> bool:
    """Whether parameter `name` (outside `stack`) comes before the stack (rule 3): in the
    module holding both, the child holding the parameter is registered before the child
    holding the stack; a parameter held directly there is an input if named in INPUT_NAMES."""
    param_parts, stack_parts = name.split("."), stack.split(".")
    common = 0
    while param_parts[common] == stack_parts[common]:
        common += 1
    holder = model.get_submodule(".".join(param_parts[:common]))
    mine, theirs = param_parts[common], stack_parts[common]
    if common == len(param_parts) - 1 or mine in INPUT_NAMES:  # held directly, or an input
        return mine in INPUT_NAMES
    children = list(holder._modules)
    return children.index(mine) < children.index(theirs)


def layer_depths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter name -> (depth below the top of its stack, N blocks of that stack), by the
    rules of this module; parameters that belong to no stack get (0, 0).

    A learning rate of lr * decay**depth gives the top (heads, final norm) the base rate, the
    last block lr * decay, and the embeddings under N blocks lr * decay**(N + 1).
    """
    stacks = find_stacks(model)
    towers = {_tower(s, stacks): s for s in stacks}
    depths: dict[str, tuple[int, int]] = {}
    for name, _ in model.named_parameters():
        tower = next((t for t in towers if _under(t, name)), None)
        if tower is None:
            depths[name] = _outside_depth(model, name, stacks)
            continue
        stack = towers[tower]
        n = stacks[stack]
        if _under(stack, name):
            child = name[len(stack) + 1 :].split(".", 1)[0]
            depths[name] = (n - list(model.get_submodule(stack)._modules).index(child), n)
        else:
            depths[name] = (n + 1 if _before(model, name, stack) else 0, n)
    return depths


def _outside_depth(model: nn.Module, name: str, stacks: dict[str, int]) -> tuple[int, int]:
    """(depth, N) of a parameter outside every tower (rule 4)."""
    holder, _, attribute = name.rpartition(".")
    if attribute == "weight" and holder:  # token_embedding.weight -> token_embedding
        holder, _, attribute = holder.rpartition(".")
    sibling = f"{holder}.transformer.resblocks" if holder else "transformer.resblocks"
    if attribute in INPUT_NAMES and sibling in stacks:  # open_clip CLIP's text inputs
        return stacks[sibling] + 1, stacks[sibling]
    if stacks and all(_before(model, name, stack) for stack in stacks):
        first = next(iter(stacks))
        return stacks[first] + 1, stacks[first]
    return 0, 0
