import subprocess


def test_cli_help():
    out = subprocess.run(["imgkit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "capture" in out and "restore" in out
