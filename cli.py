"""The command lines' one convention: a problem is one line on stderr, "error: ...", and exit
status 2, before any work is done or anything is written. argparse's own errors follow it too,
without the usage block that would bury the line."""
import argparse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}\n")
