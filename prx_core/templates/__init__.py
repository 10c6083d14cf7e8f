"""Package data: the templates ``prx-run new-plugin`` fills (``new_plugin/*.tmpl``)."""
