from mad.cli import main

main()
