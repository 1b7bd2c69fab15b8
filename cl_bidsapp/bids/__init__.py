"""cl_bidsapp.bids"""
