"""A TensorBoard tab for learnscope runs (``tensorboard --logdir …`` → *learnscope*).

Installed with the package: the entry point ``tensorboard_plugins: learnscope`` names
:class:`LearnscopePlugin`. It reads the run through TensorBoard's data provider (local
and remote log directories alike), imports neither torch nor Lightning, and serves a
frontend module without a build step or network access (see docs/plugin.md).
"""

from __future__ import annotations

from learnscope.tensorboard_plugin.plugin import PLUGIN_NAME, LearnscopePlugin

__all__ = ["PLUGIN_NAME", "LearnscopePlugin"]
