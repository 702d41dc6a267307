from mtl.cli import app

app(prog_name="mtl")
