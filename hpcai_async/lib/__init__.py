"""The official SDK's ``hpcai.lib`` import paths (``hpcai.lib.public_interfaces``), as aliases of ours."""
