"""The output format: file names, the blocks transformers and the reference read, the tool's
version, and the manifest that makes an output complete. No job machinery here."""
