def pytest_addoption(parser):
    parser.addoption(
        "--bench-compile", action="store_true",
        help="also benchmark torch.compile of the reference (slow to compile on a CPU)",
    )
