"""Small files shipped with dreamlab (installed as ``dreamlab.assets``): the builtin prior's weights."""
