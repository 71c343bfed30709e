"""The add-on path for Megatron-LM setups: Megatron-LM's own ``pretrain()`` loop, data, tokenizers,
logging and checkpoints, with the plugin's flags (``entry``: the two ways in; ``plugin``: the
plugin's state and its replacements of Megatron-LM names; ``gpt``: the dataset provider and forward
step used without a checkout).

Megatron-LM names replaced while it runs are rows of the patch table
(``integration.megatron.patches``, scopes ``megatron-lm`` and ``megatron-lm-cpu``), each restored or
scoped to the run: the decoder block spec function (the plugin router and grouped-GEMM experts
swapped in), ``setup_model_and_optimizer`` (the losses installed on the built model) and
``train_step`` (the plugin's step around Megatron-LM's, its values in Megatron-LM's TensorBoard and
W&B writers and in a line beside Megatron-LM's iteration line). Megatron's own MoE losses and loss
scaling are untouched: the plugin's losses are attached with the same ``MoEAuxLossAutoScaler``
semantics, which Megatron-LM's schedule drives.
"""
