from keyturn.sandbox.cli import app

app(prog_name="python -m keyturn.sandbox")
