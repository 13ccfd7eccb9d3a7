"""Every axis name of the project, spelled once (mesh axes and logical axes).

Parameters and activations name their dimensions logically; `parallel.mesh.DEFAULT_RULES`
maps each logical name to mesh axes. A logical name must appear here and in the rules
table: `mesh.check_rules` rejects a table that names something else or leaves a name out,
and `mesh.spec_for` rejects an array whose name has no rule (a misspelling would
otherwise be silently replicated). Adding a module with a new kind of dimension means
adding its name here and one rule in `mesh.DEFAULT_RULES`.
"""

# Mesh axes, in the mesh's order.
DATA = "data"  # pure data parallelism: parameters replicated
FSDP = "fsdp"  # data parallelism with parameters and optimizer state split
TENSOR = "tensor"  # heads / hidden units split inside each layer
MESH_AXES = (DATA, FSDP, TENSOR)
# The global batch is split over both data-parallel axes.
BATCH_AXES = (DATA, FSDP)

# Activations (`nn.with_logical_constraint`).
ACTIVATION_BATCH = "activation_batch"
ACTIVATION_LENGTH = "activation_length"
ACTIVATION_EMBED = "activation_embed"
ACTIVATION_HEADS = "activation_heads"
ACTIVATION_KV_HEADS = "activation_kv_heads"
ACTIVATION_MLP = "activation_mlp"
ACTIVATION_VOCAB = "activation_vocab"
ACTIVATION_VISION_TOKENS = "activation_vision_tokens"
ACTIVATION_VISION_EMBED = "activation_vision_embed"

# LLM parameters.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
NORM = "norm"
LAYERS = "layers"  # the stacked layer axis of `nn.scan`
# MMoE-LLM: LoRA expert banks and the router.
LORA_EXPERTS = "lora_experts"
LORA_RANK = "lora_rank"
ROUTER_HIDDEN = "router_hidden"
ROUTER_EXPERTS = "router_experts"
ROUTER_CONTEXT = "router_context"
# Vision experts, reducer, projector.
VISION_EMBED = "vision_embed"
VISION_MLP = "vision_mlp"
VISION_HEADS = "vision_heads"
VISION_POS = "vision_pos"
CONV_HEIGHT = "conv_height"
CONV_WIDTH = "conv_width"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
COTR = "cotr"
QUERIES = "queries"
PROJECTOR_IN = "projector_in"
PROJECTOR_HIDDEN = "projector_hidden"

ACTIVATION_AXES = (
    ACTIVATION_BATCH, ACTIVATION_LENGTH, ACTIVATION_EMBED, ACTIVATION_HEADS,
    ACTIVATION_KV_HEADS, ACTIVATION_MLP, ACTIVATION_VOCAB, ACTIVATION_VISION_TOKENS,
    ACTIVATION_VISION_EMBED)
PARAMETER_AXES = (
    VOCAB, EMBED, MLP, HEADS, KV_HEADS, NORM, LAYERS, LORA_EXPERTS, LORA_RANK,
    ROUTER_HIDDEN, ROUTER_EXPERTS, ROUTER_CONTEXT, VISION_EMBED, VISION_MLP, VISION_HEADS,
    VISION_POS, CONV_HEIGHT, CONV_WIDTH, CONV_IN, CONV_OUT, COTR, QUERIES, PROJECTOR_IN,
    PROJECTOR_HIDDEN)
LOGICAL_AXES = ACTIVATION_AXES + PARAMETER_AXES
