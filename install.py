"""WebUI installer hook (the WebUI runs it as a subprocess at every launch).

SEG and T-SAM need nothing beyond what the WebUI already ships (torch), so nothing is
installed here and start-up stays fast. The export's heavy optional packages (onnx,
onnxruntime-gpu, tensorrt) are never installed at launch: the Export tab offers to install
them when they are missing.
"""


def main() -> None:
    """Nothing to install: kept as a function so a later optional step has one obvious place."""


if __name__ == "__main__":
    main()
