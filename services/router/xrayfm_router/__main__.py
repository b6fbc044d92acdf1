from xrayfm_router.follow import main

main()
