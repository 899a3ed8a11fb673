import sys
from pathlib import Path

# Scenario modules shared by in-process and multi-process tests live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
