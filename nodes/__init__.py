"""The pack's ComfyUI nodes (V3 schema).

Only ever imported relatively from the pack's ``__init__.py`` (a top-level ``nodes`` module is
ComfyUI's own). :mod:`.model_files` imports no ComfyUI module, so tests can use it without a server;
the node modules need ComfyUI.
"""
