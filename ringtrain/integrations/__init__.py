"""Optional integrations with outside training libraries.

Each submodule imports its library only when used and says which extra to install:
:mod:`ringtrain.integrations.torch` (``pip install 'ringtrain[torch]'``).
"""
