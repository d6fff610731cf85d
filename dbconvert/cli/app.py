def main(): pass
app=None
