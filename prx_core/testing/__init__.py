"""Shipped test helpers: a tiny recipe, in-process training, and the plugin conformance suite.

Third-party plugins use them from their own tests::

    from prx_core.testing.conformance import PluginConformance

    class TestMyPlugin(PluginConformance):
        plugin = "my_plugin"
        recipe_patch = {"plugins": {"my_plugin": {"weight": 0.1}}}
"""
